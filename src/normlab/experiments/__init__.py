"""normlab.experiments"""
