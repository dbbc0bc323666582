"""normlab.training"""
