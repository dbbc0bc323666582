"""normlab.reports"""
