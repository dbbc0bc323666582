"""Placeholder until this package lands."""


def configure(parser):
    pass


def run(args):
    raise ValueError("'normlab experiments' is not built yet")
