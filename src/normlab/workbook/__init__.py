"""normlab.workbook"""
