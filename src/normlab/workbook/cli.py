"""Write the normalization workbook (placeholder until the workbook lands)."""


def configure(parser):
    pass


def run(args):
    raise ValueError("the workbook is not built yet")
