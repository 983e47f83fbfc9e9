"""benchmarks/bench_retinanet.py: the models' timed calls alternate round by round, ratios to
R50 are taken per round, and a ``--quick`` run writes every field the results file had."""

import json

import pytest

from benchmarks import bench_retinanet as bench

# The fields of a result row before the timing was interleaved (docs and gpu_check read them).
RESULT_FIELDS = {
    "model", "parameters", "train_step_s", "train_step_cpu_s", "load_average_1min",
    "inference_s", "inference_cpu_s", "train_peak_extra_mb", "above_bottom_up_train_cpu_s",
    "above_bottom_up_inference_cpu_s", "attention_backend", "profile_total_self_cpu_s",
    "profile_attention_share", "profile_attention_ops", "profile_attention_autograd_nodes_self_s",
    "profile_top_ops",
}  # fmt: skip


class FakeWorker:
    """Answers like a worker; its call takes ``scale`` times a clock that slows down each call."""

    def __init__(self, name, scale, log):
        self.name, self.scale, self.log = name, scale, log

    def call(self, phase):
        self.log.append((phase, self.name))
        drift = len(self.log)  # the machine gets slower call by call
        return {"wall_s": self.scale * drift, "cpu_s": self.scale * drift / 2, "started_at": 0}


def test_every_round_calls_each_model_once_in_turn():
    log, rounds = [], []
    names = ["r50", "a", "b"]
    workers = {name: FakeWorker(name, 1.0, log) for name in names}
    timings = bench.interleaved(workers, ("train", "inference"), 1, 3, lambda *r: rounds.append(r))
    # one warm-up round and three timed rounds per phase, the models alternating call by call
    expected = [
        (phase, name) for phase in ("train", "inference") for _ in range(4) for name in names
    ]
    assert log == expected
    assert rounds == [(phase, i, names) for phase in ("train", "inference") for i in range(3)]
    assert {len(answers) for per_model in timings.values() for answers in per_model.values()} == {3}


def test_ratios_to_r50_are_taken_round_by_round():
    log = []
    workers = {"r50": FakeWorker("r50", 1.0, log), "m": FakeWorker("m", 3.0, log)}
    timings = bench.interleaved(workers, ("train",), 0, 3, None)
    # calls 1..6 alternate: r50 at drift 1, 3, 5; m at 2, 4, 6
    assert [a["wall_s"] for a in timings["train"]["r50"]] == [1, 3, 5]
    assert [a["wall_s"] for a in timings["train"]["m"]] == [6, 12, 18]
    rows = bench.summarize(timings, "r50")
    assert rows["m"]["train_step_s_rounds"] == [6, 12, 18]
    assert rows["m"]["train_step_s"] == 12 and rows["m"]["train_step_cpu_s"] == 6
    assert rows["m"]["vs_base_rounds"]["train_step_s"] == pytest.approx([6, 4, 3.6])
    assert rows["m"]["vs_base"]["train_step_cpu_s"] == pytest.approx(4)
    assert rows["r50"]["vs_base"] == {"train_step_s": 1.0, "train_step_cpu_s": 1.0}
    assert bench.summarize(timings, None)["m"]["vs_base"] == {}


@pytest.mark.slow
def test_quick_run_interleaves_the_workers_and_keeps_every_field(tmp_path, capsys):
    out = tmp_path / "retinanet.json"
    models = ["retinanet_R_50_FPN_1x", "retinanet_sasa50"]
    assert bench.main(["--quick", "--models", *models, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    results = {r["model"]: r for r in report["results"]}
    assert list(results) == models
    for r in results.values():
        assert RESULT_FIELDS <= set(r)
        assert r["train_peak_extra_mb"] > 0 and r["train_step_cpu_s"] > 0
    assert set(results[models[0]]["vs_base"].values()) == {1.0}
    schedule = report["meta"]["schedule"]
    assert [(e["phase"], e["order"]) for e in schedule] == [(p, models) for p in bench.PHASES]
    # the workers' own clocks: every call starts after the one before it in the schedule
    starts = [t for entry in schedule for t in entry["started_at"]]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert all(e["load_average_1min"] >= 0 for e in schedule)
    assert "per-round train step CPU-time ratios to R50" in capsys.readouterr().out
