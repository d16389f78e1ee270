"""Data-parallel training on CPUs with gloo: two real processes (torchrun, or started by hand for the kill test)
run :mod:`mmlatent.bench.data_parallel`; their parameters must equal a one-process run over the same global
batch."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmlatent.train import EpochBatches, TrainConfig
from mmlatent.train.distributed import DistributedError, current_world, transformer_blocks

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = ["-m", "mmlatent.bench.data_parallel", "run"]
LIMIT_S = 240  # a run of two processes takes about 10 s; anything near this is a hang


def _env():
    root = os.path.dirname(HERE)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(out, *args, nproc=2):
    prefix = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    proc = subprocess.run(prefix + [*RUN, str(out), *args], env=_env(), capture_output=True, text=True,
                          timeout=LIMIT_S)
    if proc.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _relative(path_a, path_b, only=None):
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert set(a) == set(b)
    keys = [k for k in a if only is None or only in k]
    assert keys
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys) ** 0.5
    den = sum(float((b[k] ** 2).sum()) for k in keys) ** 0.5
    return num / den


def _losses(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["losses"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference (global batch 8, gradient accumulation 2) and the runs the tests compare."""
    d = tmp_path_factory.mktemp("dist")
    _run(d / "single.st", nproc=1)
    _run(d / "single-lora.st", "--lora", nproc=1)
    return d


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_data_parallel_equals_one_process(runs, parallel):
    _run(runs / f"{parallel}.st", "--parallel", parallel)
    assert _relative(runs / f"{parallel}.st", runs / "single.st") <= 1e-6
    assert _losses(runs / f"{parallel}.st") == pytest.approx(_losses(runs / "single.st"), rel=1e-6)


def test_unweighted_rank_means_differ(runs):
    """The shards hold different numbers of label tokens: averaging the ranks' means unweighted is not the global
    batch's mean, and the comparison above is sharp enough to see it."""
    _run(runs / "unweighted.st", "--parallel", "ddp", "--unweighted")
    assert _relative(runs / "unweighted.st", runs / "single.st") > 1e-3


def test_fsdp_with_activation_checkpointing_equals_one_process(runs):
    _run(runs / "fsdp-checkpointing.st", "--parallel", "fsdp", "--checkpointing")
    assert _relative(runs / "fsdp-checkpointing.st", runs / "single.st") <= 1e-6


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_data_parallel_equals_one_process(runs, parallel):
    _run(runs / f"lora-{parallel}.st", "--parallel", parallel, "--lora")
    assert _relative(runs / f"lora-{parallel}.st", runs / "single-lora.st", only="lora_") <= 1e-6


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_interrupted_and_resumed_equals_uninterrupted(runs, parallel):
    whole = runs / f"whole-{parallel}.st"
    _run(whole, "--parallel", parallel)
    checkpoint = runs / f"checkpoint-{parallel}"
    _run(runs / "part.st", "--parallel", parallel, "--until", "2", "--save", str(checkpoint))
    listed = json.load(open(checkpoint / "manifest.json"))["files"]
    if parallel == "fsdp":  # the shards are under the manifest like every other file
        assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(listed)
        assert "model.safetensors" not in listed
    else:
        assert "model.safetensors" in listed
    _run(runs / f"resumed-{parallel}.st", "--parallel", parallel, "--resume", str(checkpoint))
    assert _relative(runs / f"resumed-{parallel}.st", whole) == 0.0
    assert _losses(runs / f"resumed-{parallel}.st") == _losses(whole)


def test_resume_refuses_another_world_size_or_parallelism(runs):
    checkpoint = runs / "refuse-ddp"
    _run(runs / "part.st", "--parallel", "ddp", "--until", "1", "--save", str(checkpoint))
    with pytest.raises(AssertionError, match="written by a run of 2 process"):
        _run(runs / "x.st", "--resume", str(checkpoint), nproc=1)
    with pytest.raises(AssertionError, match="holds whole parameters and this run is FSDP2"):
        _run(runs / "x.st", "--parallel", "fsdp", "--resume", str(checkpoint))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_stops_the_others_with_a_clear_error(tmp_path):
    """Rank 1 is SIGKILLed after its second step; rank 0 must leave with a DistributedError that names the
    collective and the timeout, well before the timeout of its next collective would have passed."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, *RUN, str(tmp_path / "out.st"), "--parallel", "ddp",
                                       "--steps", "8", "--die-at-step", "2", "--timeout", "60"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0 = time.monotonic()
    try:
        _, err0 = procs[0].communicate(timeout=LIMIT_S)
        procs[1].communicate(timeout=LIMIT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode != 0
    assert "DistributedError: rank 0 of 2" in err0 and "train.dist_timeout_s = 60 s" in err0, err0[-3000:]
    assert time.monotonic() - t0 < LIMIT_S
    assert not (tmp_path / "out.st").exists()


# ------------------------------------------------------------------------------------------ in one process

def _stream(n, batch_size, world, drop_last=True):
    streams = []
    for rank in range(world):
        b = EpochBatches(list(range(n)), batch_size, lambda records, epoch: list(records), seed=5,
                         drop_last=drop_last)
        if world > 1:
            b.shard(rank, world)
        streams.append(b)
    return streams


@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_partition_each_global_batch(drop_last):
    whole, = _stream(22, 6, 1, drop_last)
    shards = _stream(22, 6, 2, drop_last)
    for _ in range(2 * whole.per_epoch):
        epoch, batch = next(whole)
        parts = [next(s) for s in shards]
        assert all(e == epoch for e, _ in parts)
        joined = parts[0][1] + parts[1][1]
        assert sorted(joined) == sorted(batch) and len(set(joined)) == len(joined)
        assert len(parts[0][1]) - len(parts[1][1]) in (0, 1)


def test_a_last_batch_too_small_to_share_is_skipped_by_every_rank():
    shards = _stream(13, 6, 4, drop_last=False)  # 6 + 6 + 1: the last record cannot go to four ranks
    assert all(s.per_epoch == 2 for s in shards)
    seen = [r for s in shards for _ in range(2) for r in next(s)[1]]
    assert len(seen) == len(set(seen)) == 12


def test_bad_shards_are_refused():
    b = EpochBatches(list(range(10)), 2, lambda records, epoch: records, seed=0)
    with pytest.raises(ValueError, match="batch_size: 2 records cannot be shared by 3 ranks"):
        b.shard(0, 3)
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world_size"):
        b.shard(2, 2)
    with pytest.raises(ValueError, match="parallel: expected one of ddp, fsdp"):
        TrainConfig(max_steps=1, parallel="zero3")
    with pytest.raises(ValueError, match="dist_timeout_s"):
        TrainConfig(max_steps=1, dist_timeout_s=0)


def test_world_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = current_world()
    assert (world.rank, world.size, world.local_rank, world.distributed, world.main) == (3, 4, 1, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK / WORLD_SIZE"):
        current_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK: expected an integer"):
        current_world()


_MAP_SHARDS = """
import json
from mmlatent.train.distributed import close_distributed, init_distributed, map_shards
world = init_distributed(60)
merged = map_shards(lambda shard: [(x, world.rank) for x in shard], range(7), world, "a test")
print(json.dumps(merged) if world.main else "", flush=True)
close_distributed(world, 60)
"""


def test_map_shards_gives_every_rank_all_items_in_order():
    """Rank r maps items r, r + 2, ...; both ranks get the 7 items back in order, each mapped once."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--no-python", sys.executable, "-c", _MAP_SHARDS],
                          env=_env(), capture_output=True, text=True, timeout=LIMIT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[i, i % 2] for i in range(7)]
    from mmlatent.train.distributed import World, map_shards
    assert map_shards(lambda shard: [x * 2 for x in shard], [1, 2], World(), "one process") == [2, 4]
    with pytest.raises(RuntimeError, match="one value per item"):
        map_shards(lambda shard: shard[:1], [1, 2], None, "a short map")


def test_transformer_blocks_are_the_decoder_layers():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert transformer_blocks(model) == list(model.model.layers)
    assert issubclass(DistributedError, RuntimeError)
    assert torch.distributed.is_available()


# ------------------------------------------------------------------------------------------ every method, CLI

_QWEN = {"tiny_qwen2_vl": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64}}
_T5 = {"tiny": {"t5": {"d_model": 32, "layers": 1, "heads": 2, "d_ff": 64}, "vae": {"block_out_channels": [32, 32]},
                "unet": {"block_out_channels": [32, 32]}}}


def _method_config(method, parallel, out, init_from=None):
    # eval_every 1: each step's evaluation shares out an odd number of records, so the ranks' generations differ
    train = dict(lr=0.003, seed=0, progress=False, parallel=parallel, output_dir=str(out), max_steps=2,
                 dist_timeout_s=120, eval_every=1)
    if method == "ivtlr":
        return dict(name="iv", model=_QWEN, data={"synthetic": {"n_train": 16, "n_eval": 5, "seed": 0}},
                    batch_size=4, k=2, max_new_tokens=4, mode="no_cot", epochs=1, eval_samples=3, train=train)
    if method == "modal_mixed":
        return dict(name="mm", method=method, model=_QWEN, batch_size=4, head={"width": 16, "depth": 1},
                    data={"synthetic": {"n_train": 16, "n_eval": 3, "seed": 0, "kinds": ["swap"]}},
                    sampler={"steps": 2}, max_new_tokens=4, eval_samples=3, train=train)
    if method == "dpmm":
        return dict(name="dp", method=method, model=_T5, data={"synthetic": {"n_train": 16, "n_eval": 3, "seed": 0}},
                    batch_size=4, max_new_tokens=8, eval_samples=3, stage="both", train=train)
    return dict(name="gr", method=method, init_from=str(init_from), group_size=4, prompts_per_step=2,
                micro_batch_size=4, eval_samples=3, max_new_tokens=8, train=train)


def _train_under_torchrun(tmp_path, method, parallel, init_from=None):
    """The final folder of a 2-process run, what it printed, and its eval.json beside the same folder evaluated
    by ``mmlatent eval`` in one process."""
    import yaml
    out = tmp_path / f"{method}-{parallel}"
    path = tmp_path / f"{method}-{parallel}.yaml"
    path.write_text(yaml.safe_dump(_method_config(method, parallel, out, init_from)))
    env = dict(_env(), MMLATENT_BACKEND="torch")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mmlatent.cli", "train", "--config", str(path)], env=env, capture_output=True,
                          text=True, timeout=LIMIT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = out / ("answer" if method == "dpmm" else "") / "final"
    assert (final / "manifest.json").is_file()
    single = tmp_path / f"{method}-{parallel}-one-process.json"
    check = subprocess.run([sys.executable, "-m", "mmlatent.cli", "eval", "--checkpoint", str(final),
                            "--out", str(single)], env=env, capture_output=True, text=True, timeout=LIMIT_S)
    assert check.returncode == 0, check.stderr[-4000:]
    return final, proc.stdout, json.loads((final / "eval.json").read_text()), json.loads(single.read_text())


def _same_evaluation(sharded, single):
    """The 2-process evaluation gathered every record once, in order: what one process scores."""
    assert sharded["n"] == single["n"] and sharded["outputs"] == single["outputs"]
    assert sharded["accuracy"] == single["accuracy"]


def test_every_method_trains_under_torchrun(tmp_path):
    """IVT-LR with DDP; Modal-mixed SFT, DPMM-CoT (both stages) and GRPO (from the Modal-mixed run) with FSDP2:
    each evaluates every step and at the end with the records shared out over the ranks, and writes a final
    folder whose one-process evaluation gives the same outputs."""
    _, printed, sharded, single = _train_under_torchrun(tmp_path, "ivtlr", "ddp")
    assert printed.count("iv: accuracy") == 1 and sharded["n"] == 5  # rank 0 alone reports
    _same_evaluation(sharded, single)
    sft, printed, sharded, single = _train_under_torchrun(tmp_path, "modal_mixed", "fsdp")
    assert "mm: accuracy" in printed
    _same_evaluation(sharded, single)
    assert sharded["latent_mse"] == pytest.approx(single["latent_mse"], rel=1e-5, nan_ok=True)
    assert [sharded[k] for k in ("sketches_matched", "sketches_missing", "sketches_extra")] == \
        [single[k] for k in ("sketches_matched", "sketches_missing", "sketches_extra")]
    assert sharded["ablation"]["zeros"] == single["ablation"]["zeros"]
    assert len(json.loads((sft / "run.json").read_text())["result"]["eval_history"]) == 2
    final, printed, sharded, single = _train_under_torchrun(tmp_path, "dpmm", "fsdp")
    assert "its rationales: ROUGE-L" in printed
    _same_evaluation(sharded, single)
    rationales = json.loads((final.parent.parent / "rationale" / "rationales.json").read_text())["rationales"]
    assert len(rationales) == 3  # every held-out record's, each written by one of the ranks
    grpo, printed, sharded, single = _train_under_torchrun(tmp_path, "grpo", "fsdp", init_from=sft)
    assert "gr: accuracy" in printed and (grpo.parent / "reward.png").is_file()
    _same_evaluation(sharded, single)
