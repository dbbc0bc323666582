"""normlab.data"""
