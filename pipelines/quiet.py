"""A quiet terminal: the frameworks' banners and known-harmless warnings, silenced in one place.

Every training entry point calls :func:`install` before its first framework call. Each filter
names one message and says why it is safe to hide; nothing is silenced by category or module
alone, so a new warning from any of these libraries still reaches the terminal.
"""

from __future__ import annotations

import logging
import os
import warnings

# Informational lines Lightning prints on every fit. Dropped because the training log says the
# same in one line of its own (device, precision, rows) and the per-epoch line says when it ends.
LIGHTNING_BANNERS = (
    "GPU available:",  # device summary; a GPU that is present but unused still warns, separately
    "TPU available:",
    "HPU available:",
    "LOCAL_RANK:",  # CUDA_VISIBLE_DEVICES of each rank
    "💡 Tip:",  # advertisements for Lightning's cloud services (LitLogger, litmodels)
    "`Trainer.fit` stopped: `max_epochs=",  # the normal end; other reasons to stop are kept
)
BANNER_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
)

# (message regex, category, module regex, why it is safe)
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str, str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree",
     "Lightning's own pytree copy still builds torch's deprecated LeafSpec; its results are unchanged "
     "and the fix belongs to Lightning"),
    (r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a "
     r"`LightningDataModule`", UserWarning, r"lightning\.pytorch\..*",
     "intended: RankingModule moves its own Batch (a KeyedJaggedTensor) to the device and the data "
     "module has no such hook, so the module's is the one that must run"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning,
     r"lightning\.pytorch\..*",
     "metrics are logged per epoch, which small runs still get; only the optional per-step points are absent"),
    (r"It is recommended to use `self\.log\('(train|val)/[^']*', \.\.\., sync_dist=True\)` when logging on epoch "
     r"level in distributed setting", UserWarning, r"lightning\.pytorch\..*",
     "RankingModule's epoch values are already global without it: torchmetrics' compute() gathers every "
     "rank's state, every rank validates on the whole split, and the running means pass sync_dist"),
)

# One-time notices from torch's loggers, aimed at library authors rather than at us.
TORCH_NOTICES = {
    # torchrec asks is_fx_tracing() whether it is being symbolically traced; training never runs
    # under torch.export, so the distinction the notice is about cannot arise here.
    "torch.fx._symbolic_trace": "is_fx_tracing will return true for both",
}

# fbgemm_gpu (under torchrec) announces each of its ~14 native libraries at INFO on the root logger
# when it is imported after logging is configured; a library that fails to load still raises.
ROOT_NOTICES = ("Successfully loaded: 'fbgemm_gpu",)

# MLflow announces creating and migrating a new sqlite store's tables (two INFO lines on every
# fresh store); errors and warnings from the same module still show.
MLFLOW_QUIET_LOGGERS = ("mlflow.store.db.utils",)

# MLflow's tqdm bar for artifact downloads and uploads (read at each call by
# mlflow.utils.file_utils.ArtifactProgressBar); our own log lines say what was fetched.
ARTIFACT_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
# With a tracking server, MLflow prints two lines ("View run ... at", "View experiment at") to stdout
# each time a run ends: fourteen a pipeline night, before its result; the pipeline prints the runs list's link.
RUN_URL_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


class _DropMessages(logging.Filter):
    """Drop records whose message starts with (or, with ``anywhere``, contains) one of ``texts``."""

    def __init__(self, texts: tuple[str, ...], anywhere: bool = False) -> None:
        super().__init__()
        self.texts = texts
        self.anywhere = anywhere

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if self.anywhere:
            return not any(t in msg for t in self.texts)
        return not msg.lstrip().startswith(self.texts)


def _add_once(logger: logging.Logger, flt: _DropMessages) -> None:
    if not any(isinstance(f, _DropMessages) and f.texts == flt.texts for f in logger.filters):
        logger.addFilter(flt)


def install() -> None:
    """Silence the known banners and warnings; idempotent, and cheap enough to call at every entry point.

    Also, when the application has configured the root logger (the ``ranker`` CLI does), Lightning's
    loggers hand their records to it instead of printing them with handlers of their own, so each
    line appears once, in the application's format.

    Example:
        >>> install(); install()  # twice is the same as once
        >>> logging.getLogger("mlflow.store.db.utils").level == logging.WARNING
        True
    """
    for pattern, category, module, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category, module=module)
    for name in BANNER_LOGGERS:
        _add_once(logging.getLogger(name), _DropMessages(LIGHTNING_BANNERS))
    for name, text in TORCH_NOTICES.items():
        _add_once(logging.getLogger(name), _DropMessages((text,), anywhere=True))
    _add_once(logging.getLogger(), _DropMessages(ROOT_NOTICES))
    quiet_store()
    os.environ.setdefault(ARTIFACT_BAR_ENV, "false")  # a user who set it keeps their choice
    os.environ.setdefault(RUN_URL_ENV, "true")
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True


def quiet_store() -> None:
    """Only MLflow's announcements of a new store's tables: for code that opens a store before :func:`install`."""
    for name in MLFLOW_QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
