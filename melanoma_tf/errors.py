"""The project's error base class.

Every error a user can cause (a config key, a data file, a model file, a metric that
cannot be computed) derives from :class:`MelanomaTfError`; its message names the file,
row or key. :func:`melanoma_tf.cli.run_main` prints it as one line and exits 2, so no
command shows a traceback for bad input. Import nothing here: every module may use it.
"""


class MelanomaTfError(Exception):
    """A problem with what the user gave (config, data, model file); the message says where."""


class TrialError(MelanomaTfError, RuntimeError):
    """A sweep trial (a training process or a Ray trial) failed; the message names its log."""
