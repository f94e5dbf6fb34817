"""The device run (benchmarks/device/run.sh) rehearsed on this build, as the GPU machine runs it:
the fake CUDA driver in place of a GPU, the main build reused (--build-dir), a tiny model.

Checks what the device call depends on: the output folder comes back whole (at most 8 files, at
most two folders down), its summary names every phase with a status, a failing phase does not
stop the ones after it, and a short budget ends the run in time with a partial summary.
Run by ctest (device_rehearsal) with LEMA_SOURCE_DIR and LEMA_BINARY_DIR set.
"""
import json
import os
import pathlib
import subprocess
import tarfile
import tempfile
import time
import unittest

SOURCE = pathlib.Path(os.environ["LEMA_SOURCE_DIR"])
BUILD = pathlib.Path(os.environ["LEMA_BINARY_DIR"])
RUN = SOURCE / "benchmarks" / "device" / "run.sh"
MAX_FILES = 8  # what the device machine returns from $OUT
MAX_DEPTH = 2  # folders down
GPU_ONLY = {"train_half_cached", "train_resident_small", "train_half_small", "train_half_managed",
            "train_unified", "cuda_alloc", "preload_oversubscribe"}
STATUS_PREFIXES = ("ok", "failed", "timed out", "skipped: ")


def phases():
    return subprocess.run(["bash", str(RUN), "--list-phases"], check=True, capture_output=True,
                          text=True).stdout.split()


def rehearse(out, *args, env=None):
    started = time.monotonic()
    proc = subprocess.run(["bash", str(RUN), "--cpu-rehearsal", "--build-dir", str(BUILD), *args,
                           str(out)], capture_output=True, text=True, env=env, timeout=600)
    return proc, time.monotonic() - started


class DeviceRehearsal(unittest.TestCase):
    def assert_well_formed(self, out, proc):
        files = [p for p in out.rglob("*") if p.is_file()]
        self.assertLessEqual(len(files), MAX_FILES, [str(p) for p in files])
        for p in out.rglob("*"):
            self.assertLessEqual(len(p.relative_to(out).parts) - 1, MAX_DEPTH, p)
        summary = json.loads((out / "summary.json").read_text())
        names = [p["name"] for p in summary["phases"]]
        self.assertEqual(names, phases())
        for p in summary["phases"]:
            self.assertTrue(p["status"].startswith(STATUS_PREFIXES), p)
        table = (out / "summary.md").read_text()
        for name in names:
            self.assertIn(f"| {name} |", table)
        # The summary is the last thing on stdout: the device returns the output's tail.
        self.assertIn("| train_table |", proc.stdout[-12000:])
        with tarfile.open(out / "logs.tar.gz") as logs:
            self.assertIn("./environment.log", logs.getnames())
        return {p["name"]: p for p in summary["phases"]}

    def test_every_cpu_phase_runs_and_the_gpu_ones_say_why_not(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "out"
            proc, _ = rehearse(out, "--budget", "300")
            self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-2000:])
            status = self.assert_well_formed(out, proc)
            for name in ("deps", "configure", "build_core", "build_torch"):
                self.assertEqual(status[name]["status"], "skipped: build folder given")
            for name in GPU_ONLY:
                self.assertEqual(status[name]["status"], "skipped: no GPU")
            for name in set(status) - GPU_ONLY - {"deps", "configure", "build_core", "build_torch"}:
                self.assertEqual(status[name]["status"], "ok", status[name])
            # The libtorch GPU test is among the gpu-labelled ones (it skips here: no CUDA).
            self.assertRegex(status["ctest_torch"]["note"], r"out of [1-9]")
            bench = json.loads((out / "device_bench.json").read_text())
            self.assertIn("h2d", bench)
            self.assertIn("pager", bench)
            runs = json.loads((out / "train_steps.json").read_text())["runs"]
            self.assertIsNotNone(runs["resident"])
            self.assertIsNotNone(runs["half"])
            self.assertIsNone(runs["unified"])

    def test_a_failing_phase_does_not_stop_the_next(self):
        # Without its Python the bandwidth phase cannot merge its table and fails; the model is
        # still generated after it, and the summary says why the phase failed.
        env = dict(os.environ, LEMA_PYTHON="/nonexistent/python3")
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "out"
            proc, _ = rehearse(out, "--budget", "200", "--phases",
                               "environment,bandwidth,gen_model", env=env)
            self.assertNotEqual(proc.returncode, 0)
            status = self.assert_well_formed(out, proc)
            self.assertEqual(status["bandwidth"]["status"], "failed")
            self.assertIn("/nonexistent/python3", status["bandwidth"]["note"])
            self.assertEqual(status["gen_model"]["status"], "ok")
            self.assertEqual(status["ctest_gpu"]["status"], "skipped: not selected")

    def test_a_short_budget_ends_in_time_with_a_partial_summary(self):
        budget = 15
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "out"
            proc, took = rehearse(out, "--budget", str(budget))
            self.assertLess(took, budget + 15, proc.stdout[-3000:])
            status = self.assert_well_formed(out, proc)
            skipped = [n for n, p in status.items() if p["status"] == "skipped: deadline"]
            self.assertTrue(skipped, status)
            self.assertNotIn("not reached", [p["status"] for p in status.values()])


if __name__ == "__main__":
    unittest.main(verbosity=2)
