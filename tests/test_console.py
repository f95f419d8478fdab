"""A quiet console: a run prints its own lines and the warnings that matter, not the known noise of
the libraries underneath, and ends with one line saying where to look."""
import re
import textwrap
import warnings

from conftest import run_cli

# What `make demo` printed before its result line, none of it about the run
NOISE = [
    "`.fit(ckpt_path=None)` was called without a model",  # Lightning: OnExceptionCheckpoint's resume rule
    '.fit(ckpt_path="last") is set, but there is no last checkpoint',
    "`isinstance(treespec, LeafSpec)` is deprecated",  # torch, from Lightning's own _pytree.py
    "try installing [litlogger]",  # Lightning's advertisement
    "GPU available:",  # Lightning's device summary
    "TPU available:",
    "Creating initial MLflow database tables",  # MLflow, on a new SQLite store
    "Updating database tables",
]
QUICK = ["experiment=smoke", "dataset=digits", "trainer.limit_train_batches=2", "eval.n_chips=1"]
WHERE = re.compile(r"run (?P<run_id>[0-9a-f]{32}) in experiment 'quiet': mlflow ui --backend-store-uri (?P<uri>\S+)"
                   r"  \(then open http://127\.0\.0\.1:5000\)")


def _noise(proc):
    console = proc.stdout + proc.stderr
    return [n for n in NOISE if n in console]


def test_a_run_prints_none_of_the_known_noise_and_ends_with_where_to_look(workdir):
    from mlflow.tracking import MlflowClient

    proc = run_cli([*QUICK, "logger.experiment_name=quiet"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _noise(proc) == []
    last = proc.stdout.strip().splitlines()[-1]
    where = WHERE.fullmatch(last)
    assert where, proc.stdout[-2000:]
    assert where["uri"] == f"sqlite:///{workdir / 'mlflow.db'}"
    run = MlflowClient(tracking_uri=where["uri"]).get_run(where["run_id"])  # the line names the run
    assert run.info.status == "FINISHED" and "test/acc_xbar_mean" in run.data.metrics


USER_CALLBACK = textwrap.dedent('''
    import warnings
    import pytorch_lightning as pl

    class WarnAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            warnings.warn("a real warning from the user's callback")
''')


def test_real_warnings_still_reach_the_console(workdir, tmp_path_factory):
    """A warning of the user's code, and Lightning's for a setting that makes no sense (a logging
    interval longer than the epoch), both show; the known noise does not."""
    folder = tmp_path_factory.mktemp("usercb")
    (folder / "usercb.py").write_text(USER_CALLBACK)
    proc = run_cli([*QUICK, "trainer.log_every_n_steps=50", "+trainer.callbacks=[{_target_:usercb.WarnAtStart}]"],
                   cwd=workdir, env_extra={"PYTHONPATH": str(folder)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "UserWarning: a real warning from the user's callback" in proc.stderr
    assert "is smaller than the logging interval Trainer(log_every_n_steps=50)" in proc.stderr
    assert _noise(proc) == []


def test_the_filter_is_narrow():
    """Only torch's LeafSpec deprecation raised from Lightning's _pytree.py is ignored: the same
    deprecation from any other code, and any other warning, still show; Lightning's rank-zero
    logger still passes warnings."""
    import logging

    from pytorch_lightning.utilities._pytree import _tree_flatten
    from torch.utils._pytree import LeafSpec

    from xbarflow.runtime import LIGHTNING_INFO_LOGGER, quiet_known_noise

    logger = logging.getLogger(LIGHTNING_INFO_LOGGER)
    level = logger.level
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_noise()
            _tree_flatten(1)  # Lightning builds a LeafSpec: ignored
            LeafSpec()  # anyone else: shown
            warnings.warn("x", stacklevel=1)  # a user's warning: shown
        assert [(w.category, str(w.message)[:20]) for w in caught] == [
            (FutureWarning, "`isinstance(treespec"), (UserWarning, "x")]
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(level)


def test_where_to_look_redacts_and_links_a_server():
    from xbarflow.tracking import where_to_look

    assert where_to_look("http://bob:s3cret@mlflow.lab:5000/", "e", "abc", experiment="7") == \
        "run abc in experiment 'e': http://bob:***@mlflow.lab:5000/#/experiments/7/runs/abc"
    line = where_to_look("postgresql://bob:s3cret@db/mlflow", "e", "abc", kind="sweep")
    assert line == ("sweep abc in experiment 'e': mlflow ui --backend-store-uri 'postgresql://bob:***@db/mlflow'"
                    "  (then open http://127.0.0.1:5000)")


def test_a_fresh_fit_neither_warns_nor_resumes_from_a_used_folder(tmp_path):
    """With Lightning's OnExceptionCheckpoint, fit(ckpt_path=None) meant "last": two warnings, and a
    fit in a folder holding last.ckpt (or interrupted.ckpt) continued from it. The trainer's
    InterruptedCheckpoint keeps the checkpoint on an exception and leaves resuming to resume=true."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from xbarflow.training.checkpoints import InterruptedCheckpoint

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            if self.fail_at is not None and self.global_step == self.fail_at:
                raise RuntimeError("injected")
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        fail_at = None

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    folder = tmp_path / "checkpoints"

    def trainer():
        return pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=1),
                                     InterruptedCheckpoint(str(folder))])

    trainer().fit(Tiny(), loader)
    assert (folder / "last.ckpt").exists() and not (folder / "interrupted.ckpt").exists()
    failing = Tiny()
    failing.fail_at = 1
    # a second fit into the same folder: Lightning rightly warns that older checkpoints lie beside
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer().fit(failing, loader)
        except RuntimeError:
            pass
    assert any(re.match(r"Checkpoint directory .* exists and is not empty", str(w.message)) for w in caught)
    assert (folder / "interrupted.ckpt").exists()
    again = trainer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.fit(Tiny(), loader)
    assert again.ckpt_path is None  # from the start, not from last.ckpt or interrupted.ckpt
    assert [str(w.message) for w in caught if "ckpt_path" in str(w.message)] == []
    assert not (folder / "interrupted.ckpt").exists()  # a fit that ends normally removes it
