"""Studies of what normalization does, each a report section (and, for some, a bundled
suite) with a figure, a table and a verdict generated from the numbers, with intervals
over seeds.

- :mod:`normlab.studies.batchsize`: test error against batch size per norm, after Wu &
  He (2018) (the ``batch-sizes`` suites: every norm x a range of batch sizes).
- :mod:`normlab.studies.lrrange`: normalization widens the range of learning rates that
  train (the ``lr-range`` suite: every norm x a log grid of learning rates).
- :mod:`normlab.studies.ghost`: BN's statistics over virtual batches at a fixed SGD batch
  (the ``ghost-batch`` suite): noisy statistics apart from optimizer noise.
- :mod:`normlab.studies.running`: running statistics against statistics recalibrated
  after each epoch, per BN momentum (the ``running-stats`` suite, trained with
  ``precise_bn``).
- :mod:`normlab.studies.precise`: PreciseBN, the recalibration itself (``RunConfig.
  precise_bn``, ``normlab train --precise-bn``): the batch-statistics norms' running
  statistics replaced by their average over training batches.
- :mod:`normlab.studies.testbatch`: test-batch dependence, for any suite, from its trained
  checkpoints: accuracy with running statistics, with the test batch's own statistics
  over mixed batches of 1000, 8 and 2, and over single-class batches.

Nothing is imported here: ``import normlab.studies`` costs nothing, and each study loads
its own dependencies (matplotlib, scipy) when used.
"""
