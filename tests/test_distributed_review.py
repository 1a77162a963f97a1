"""Distributed helpers: the collective timeout setting, and the runner's sharding under torchrun with
a dataset size that no process count divides."""

import json
import subprocess
import sys
import textwrap

import pytest

from dcnbench.runner import distributed as dist

SHARDS = textwrap.dedent("""
    import json, sys, torch
    from torch.utils.data import Dataset
    from dcnbench.runner import distributed as dist
    from dcnbench.runner import train

    class Indexed(Dataset):  # item i: its index and one draw of the global RNG (what a random flip uses)
        def __len__(self):
            return 11
        def __getitem__(self, i):
            return torch.zeros(1), {"i": i, "draw": float(torch.rand(()))}

    dist.init_from_env()
    batches = train._forever(train._loader(Indexed(), "rfcn", 6, True, seed=7))
    seen = [[(t["i"], t["draw"]) for t in next(batches)[1]] for _ in range(4)]
    evaluated = [t["i"] for _, targets in train._loader(Indexed(), "rfcn", 3, False, 0) for t in targets]
    parts = dist.gather({"train": seen, "eval": evaluated})
    if dist.is_main():
        json.dump(parts, open(sys.argv[1], "w"))
    dist.shutdown()
""")


def test_timeout_setting_is_checked_and_named(monkeypatch):
    monkeypatch.delenv("DCNBENCH_DIST_TIMEOUT_S", raising=False)
    assert dist.timeout_s() == 1800
    monkeypatch.setenv("DCNBENCH_DIST_TIMEOUT_S", "60")
    assert dist.timeout_s() == 60
    for bad in ("abc", "0", "-5", "inf", "nan", ""):
        monkeypatch.setenv("DCNBENCH_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match=f"DCNBENCH_DIST_TIMEOUT_S must be a positive number of seconds, got {bad!r}"):
            dist.timeout_s()


@pytest.mark.slow
def test_global_batches_and_evaluation_shards_do_not_depend_on_the_process_count(tmp_path):
    """11 images, global batch 6, under torchrun with 1 and 3 gloo processes: the k-th global batch
    (the ranks' k-th batches together) holds the same images with the same random draws, no image
    twice in a pass; evaluation visits every image exactly once."""
    script = tmp_path / "shards.py"
    script.write_text(SHARDS)
    runs = {}
    for nproc in (1, 3):
        out = tmp_path / f"shards{nproc}.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                        str(script), str(out)], check=True, capture_output=True, timeout=120)
        parts = json.loads(out.read_text())
        runs[nproc] = [sorted(item for part in parts for item in part["train"][k]) for k in range(4)]
        assert sorted(i for part in parts for i in part["eval"]) == list(range(11))
    assert runs[3] == runs[1]
    assert all(len(batch) == 6 and len({i for i, _ in batch}) == 6 for batch in runs[1])
    assert runs[1][0] != runs[1][1]  # a new shuffle and new draws every pass (one batch per pass here)


BUFFERS = """
import sys, torch
from dcnbench.runner import distributed as dist

dist.init_from_env()
bn = torch.nn.BatchNorm1d(3)
bn.running_mean.fill_(float(dist.rank() + 1))
bn.num_batches_tracked.fill_(10 + dist.rank())
dist.broadcast_buffers(bn)
with open(f"{sys.argv[1]}/rank{dist.rank()}.txt", "w") as f:
    f.write(f"{bn.running_mean.tolist()} {int(bn.num_batches_tracked)}")
dist.shutdown()
"""


@pytest.mark.slow
def test_every_rank_evaluates_with_rank_0s_batchnorm_statistics(tmp_path):
    """broadcast_buffers leaves rank 0's buffers (float and integer) on every rank: train() ends with
    it, since each rank's last forward left its own BatchNorm statistics, so that every evaluation
    shard is scored by the model the checkpoint saves."""
    import subprocess
    import sys

    script = tmp_path / "buffers.py"
    script.write_text(BUFFERS)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script), str(tmp_path)], capture_output=True, timeout=120, check=True)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "[1.0, 1.0, 1.0] 10"
