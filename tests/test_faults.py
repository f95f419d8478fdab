"""Faults: failed jobs, SIGTERM + resume, reproducibility, bad input at the command line."""
import json
import textwrap

import pytest
from conftest import run_cli

FAULTS = textwrap.dedent('''
    import os, signal, sys, threading, time
    import pytorch_lightning as pl

    class RaiseAtStep(pl.Callback):
        """Raise in training at global step `step`, only for runs of training mode `when_mode`."""
        def __init__(self, step, when_mode=None):
            self.step, self.when_mode = step, when_mode
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.step and self.when_mode in (None, pl_module.training_cfg.mode):
                raise RuntimeError(f"injected fault at step {self.step}")

    class SigtermAtStep(pl.Callback):
        """Send SIGTERM to this process at global step `step` (as SLURM pre-emption does)."""
        def __init__(self, step):
            self.step = step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGTERM)

    class SigtermInEvaluation(pl.Callback):
        """After the fit, send SIGTERM once the main thread is inside xbarflow.evaluation.evaluate
        (outside Lightning's own SIGTERM handling)."""
        def on_fit_end(self, trainer, pl_module):
            main = threading.main_thread().ident

            def watch():
                while True:
                    frame = sys._current_frames().get(main)
                    while frame is not None:
                        code = frame.f_code
                        if code.co_name == "evaluate" and code.co_filename.endswith("evaluation.py"):
                            os.kill(os.getpid(), signal.SIGTERM)
                            return
                        frame = frame.f_back
                    time.sleep(0.005)

            threading.Thread(target=watch, daemon=True).start()
''')


@pytest.fixture
def faults_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    (d / "faultinject.py").write_text(FAULTS)
    return d


def _client(workdir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def _all_runs(client):
    exp = client.get_experiment_by_name("xbarflow")
    return client.search_runs([exp.experiment_id], max_results=100)


SECTION8 = ["test/acc_software", "test/acc_xbar_nominal", "test/acc_xbar_mean", "test/acc_xbar_std", "test/acc_xbar_min"]


def test_failing_job_is_marked_failed_and_the_sweep_goes_on(workdir, faults_dir):
    proc = run_cli(["-m", "experiment=smoke", "training=tech_aware,standard",
                    "+trainer.callbacks=[{_target_:faultinject.RaiseAtStep,step:2,when_mode:tech_aware}]"],
                   cwd=workdir, env_extra={"PYTHONPATH": str(faults_dir)})
    assert proc.returncode != 0  # the sweep reports its failure
    assert "1 of 2 jobs failed" in proc.stderr
    table = proc.stdout[proc.stdout.index("Sweep summary"):]
    assert "| 0 | FAILED | tech_aware |" in table and "| 1 | FINISHED | standard |" in table
    runs = {r.data.tags.get("training", "parent"): r for r in _all_runs(_client(workdir))}
    assert runs["tech_aware"].info.status == "FAILED"
    assert "injected fault at step 2" in runs["tech_aware"].data.tags["error"]
    assert runs["standard"].info.status == "FINISHED" and "test/acc_xbar_mean" in runs["standard"].data.metrics
    assert runs["parent"].info.status == "FAILED"
    assert not any(r.info.status == "RUNNING" for r in runs.values())


def _smoke(workdir, faults_dir, args, *, ok=True):
    """One ``run.py`` job with the fault injectors importable; ``ok``: it must succeed."""
    r = run_cli(args, cwd=workdir, env_extra={"PYTHONPATH": str(faults_dir)})
    if ok:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def _sigterm_at(step: int) -> str:
    return f"+trainer.callbacks=[{{_target_:faultinject.SigtermAtStep,step:{step}}}]"


def test_sigterm_checkpoints_kills_and_resume_matches_uninterrupted(workdir, faults_dir):
    common = ["experiment=smoke", "training.epochs=3", "trainer.limit_train_batches=4", "seed=7"]
    _smoke(workdir, faults_dir, common + [f"hydra.run.dir={workdir / 'ref'}"])
    _smoke(workdir, faults_dir, common + [f"hydra.run.dir={workdir / 'again'}"])

    run_dir = workdir / "interrupted"
    killed = _smoke(workdir, faults_dir, common + [f"hydra.run.dir={run_dir}", _sigterm_at(6)], ok=False)
    assert killed.returncode != 0
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "checkpoints" / "interrupted.ckpt").exists()
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = _client(workdir)
    assert client.get_run(run_id).info.status == "KILLED"

    _smoke(workdir, faults_dir, common + [f"hydra.run.dir={run_dir}", "resume=true"])
    runs = {r.info.run_id: r for r in _all_runs(client)}
    assert len(runs) == 3  # ref, again, and the interrupted run continued in place
    by_dir = {r.data.tags["output_dir"]: r for r in runs.values()}
    r_ref, r_again, r_res = by_dir[str(workdir / "ref")], by_dir[str(workdir / "again")], by_dir[str(run_dir)]
    assert r_res.info.run_id == run_id and r_res.info.status == "FINISHED"
    for key in SECTION8:
        assert r_res.data.metrics[key] == r_ref.data.metrics[key], key  # resume == uninterrupted
        assert r_again.data.metrics[key] == r_ref.data.metrics[key], key  # same seed twice == identical
    assert len(client.get_metric_history(run_id, "val/acc")) == 3  # one per epoch, none lost or doubled


def test_resume_from_a_mid_epoch_checkpoint_matches_uninterrupted(workdir, faults_dir):
    """Stopped in the middle of an epoch, with randomly cropped and flipped images: last.ckpt was
    written within the epoch (trainer.checkpoint_every_n_steps), and resume=true continues from
    that step on the batches, and augmentations, the uninterrupted run had: the same numbers."""
    import torch

    common = ["experiment=smoke", "training.epochs=2", "trainer.limit_train_batches=5", "seed=3",
              "dataset.crop_padding=2", "dataset.hflip=true", "trainer.checkpoint_every_n_steps=2"]
    _smoke(workdir, faults_dir, common + [f"hydra.run.dir={workdir / 'ref'}"])
    run_dir = workdir / "interrupted"
    # epoch 0 is steps 1-5; SIGTERM before the 4th batch of epoch 1, after last.ckpt at step 8
    killed = _smoke(workdir, faults_dir, common + [f"hydra.run.dir={run_dir}", _sigterm_at(8)], ok=False)
    assert killed.returncode != 0
    assert "weights_only" not in killed.stdout + killed.stderr  # the saves within the epoch are silent
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 8 and last["epoch"] == 1  # mid-epoch, not epoch 0's end (step 5)
    # one last.ckpt, written within epochs and at their ends alike (not an epoch's end in last-v1.ckpt)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*")) == ["last.ckpt"]
    resumed = _smoke(workdir, faults_dir, common + [f"hydra.run.dir={run_dir}", "resume=true"])
    assert "not resumable" not in resumed.stderr  # Lightning's warning for loaders without a position
    by_dir = {r.data.tags["output_dir"]: r for r in _all_runs(_client(workdir))}
    r_ref, r_res = by_dir[str(workdir / "ref")], by_dir[str(run_dir)]
    assert r_res.info.status == "FINISHED"
    for key in SECTION8:
        assert r_res.data.metrics[key] == r_ref.data.metrics[key], key
    # the trained weights themselves: the same steps on the same batches through the same kernels
    final = [torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
             for d in (workdir / "ref", run_dir)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    client = _client(workdir)
    assert [m.step for m in client.get_metric_history(r_res.info.run_id, "val/acc")] == \
        [m.step for m in client.get_metric_history(r_ref.info.run_id, "val/acc")]


def test_sigterm_while_evaluating_marks_the_run_killed(workdir, faults_dir):
    """SIGTERM outside the fit (here during the evaluation over chips) ends the job with 143 and
    its run KILLED, not left RUNNING (Python's default action would end the process at once)."""
    run_dir = workdir / "stopped"
    proc = _smoke(workdir, faults_dir, ["experiment=smoke", "dataset=digits", "trainer.limit_train_batches=2",
                                        "training.epochs=1", f"hydra.run.dir={run_dir}",
                                        "+trainer.callbacks=[{_target_:faultinject.SigtermInEvaluation}]"], ok=False)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "interrupted by SIGTERM: run marked KILLED" in proc.stderr
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    run = _client(workdir).get_run(run_id)
    assert run.info.status == "KILLED" and "test/acc_xbar_mean" not in run.data.metrics


def test_corrupt_dataset_file_is_one_line(workdir):
    files = workdir / "idx"
    files.mkdir()
    for stem in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        (files / f"{stem}.gz").write_bytes(b"this is not gzip data")
    proc = run_cli(["experiment=smoke", "dataset=fashion_mnist", f"dataset.files={files}"], cwd=workdir)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: corrupt dataset file") and "train-images" in lines[0]
    assert not (workdir / "mlflow.db").exists()


def test_unavailable_dataset_says_how_to_get_it(workdir):
    proc = run_cli(["experiment=smoke", "dataset=cifar10", f"dataset.root={workdir / 'none'}", "dataset.download=false"],
                   cwd=workdir)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "dataset cifar10 is not available" in lines[0] and "dataset=mnist5k" in lines[0]


def test_device_yaml_with_extra_key_is_rejected(workdir, tmp_path_factory):
    extra = tmp_path_factory.mktemp("userconf")
    (extra / "hardware").mkdir()
    (extra / "hardware" / "odd.yaml").write_text("name: odd\nr_on: 1.0e4\nr_off: 1.0e5\nc2c: 0.0\nd2d: 0.0\ncolour: blue\n")
    proc = run_cli(["experiment=smoke", f"hydra.searchpath=[file://{extra}]", "hardware=odd"], cwd=workdir)
    assert proc.returncode != 0 and "hardware.colour" in proc.stderr
    assert not (workdir / "mlflow.db").exists()
