"""One cell of the launch matrix (policy backend + parallel layout × generation backend), run end to end.

:func:`run_cell` launches ``nemo_igrpo.cli train`` the way a user does — ``torchrun --nproc-per-node N`` or one
plain process — on the tiny CPU shape for 2 steps, continues it with ``trainer.resume=auto`` to a third step, and
:func:`check_cell` asserts what every cell must satisfy:

* both launches exit 0; the step-2 and step-3 checkpoints are complete; ``final/`` exists;
* the second launch resumed from the step-2 checkpoint (a fresh start would also leave steps 1, 2, 3 in
  ``metrics.jsonl``): it says so, leaves the first launch's step-1/2 records and step-2 checkpoint untouched, and
  trains step 3 on the data cursor that checkpoint recorded;
* ``final/`` loads in transformers and its log-probs of a fixed token sequence equal the trainer's own (the policy
  backend's ``compute_logprobs`` on the final weights, captured inside the run) to 1e-5;
* after every weight sync the engine's log-probs equal the trainer's: the ``train/mismatch/*`` metrics of each step
  (the generator's sampled-token log-probs vs the trainer's, before that step's update) are ≈ 0.

It reuses ``test_distributed``'s entry point (which registers a reward that varies with the sampled text) and its
launcher; Megatron cells additionally apply ``megatron_cpu_patch`` in every process. It is generic over the
generation backend: a server cell passes its URL/token overrides and environment in ``overrides`` / ``env``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from test_distributed import TINY, _free_port, _run

HERE = Path(__file__).resolve().parent

# The tiny shape of test_distributed, without the warm start (the matrix checks plumbing, not learning) and
# without held-out evaluation; 2 prompts × 2 samples per rank at DP=2.
BASE = [*(o for o in TINY if not o.startswith(("warm_start.steps", "trainer.resume"))),
        "warm_start.steps=0", "trainer.eval_every=0", "trainer.save_every=1", "trainer.keep_last=3"]

# A fixed sequence (ids < the tiny char vocabulary's 101), two equal-length rows so a pipeline's fixed P2P shapes
# hold; scored by the trainer at the end of the run and by transformers from final/.
FIXED = [[3, 17, 40, 5, 22, 61, 9, 33, 12, 70, 44, 8], [50, 2, 19, 27, 88, 6, 31, 15, 64, 11, 7, 95]]
PROMPT = 4  # the first PROMPT tokens of each row are "prompt" (no log-prob compared)

FINAL_TOLERANCE = 1e-5  # fp32 on both sides, same weights; measured differences are ≤ 1e-6 on these 12-token rows
# |log π_gen − log π_trainer| per token ≤ 1e-4 (fp32 vLLM vs trainer, ENVIRONMENT.md: ≤ 3e-5 max). token_prob_error
# is the token-mean of exp|Δ|, so it stays within e^1e-4 − 1 ≈ 1e-4 of 1; seq_kl sums Δ²/2 ≤ 5e-9 over ≤ 24
# completion tokens per sequence, far below 1e-6.
MISMATCH_TOLERANCE = 1e-4
SEQ_KL_TOLERANCE = 1e-6

_WRAPPER = '''
import runpy, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
if {megatron!r}:
    import megatron_cpu_patch
    megatron_cpu_patch.apply()
import torch
import nemo_igrpo.trainer as trainer
from nemo_igrpo import distributed
from nemo_igrpo.algorithms.batch import RolloutBatch, pad_sequences

_export = trainer.export_final


def export_and_score(directory, policy, tokenizer, *rest):
    # The trainer's own log-probs of the fixed sequence on the final weights, for comparison with final/.
    _export(directory, policy, tokenizer, *rest)
    rows = {fixed!r}
    ids, attention, mask, gen = pad_sequences([r[:{prompt}] for r in rows], [r[{prompt}:] for r in rows], 0)
    batch = RolloutBatch(ids, attention, mask, torch.zeros(len(rows)), torch.arange(len(rows)), gen)
    stats = policy.compute_logprobs(batch)
    if distributed.is_main():
        torch.save({{"logprobs": stats.logprobs, "mask": mask}}, Path(directory).parent / "trainer_logprobs.pt")


trainer.export_final = export_and_score
runpy.run_path({entry!r}, run_name="__main__")
'''


@dataclass
class CellResult:
    run_dir: Path
    seconds: float  # both launches, wall clock
    records: list[dict] = field(default_factory=list)
    first_metrics: str = ""  # metrics.jsonl after the first launch
    first_checkpoint: tuple[str, int] = ("", 0)  # step 2's trainer_state.json after the first launch: text, mtime
    resumed_output: str = ""  # the second launch's stdout


def run_cell(tmp_path: Path, overrides: list[str], *, nproc: int = 2, env: dict | None = None,
             timeout: float = 900) -> CellResult:
    """Train 2 steps, resume to 3 (``trainer.resume=auto``); assert both launches exit 0; return the metrics.

    ``overrides``: the cell's backends and layout (e.g. ``policy.backend=megatron``, ``generation.backend=vllm``,
    server URL/token); ``nproc`` 1 runs one plain process, otherwise torchrun with ``nproc`` processes.
    """
    from nemo_igrpo.tracking import read_metrics

    run_dir = tmp_path / "run"
    megatron = "policy.backend=megatron" in overrides
    wrapper = tmp_path / "harness_entry.py"
    wrapper.write_text(_WRAPPER.format(tests=str(HERE), megatron=megatron, fixed=FIXED, prompt=PROMPT,
                                       entry=str(tmp_path / "entry.py")))
    started = time.time()
    first_metrics, first_checkpoint = "", ("", 0)
    for steps, resume in ((2, "none"), (3, "auto")):
        launch = ([] if nproc == 1 else
                  ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}"])
        command = [*launch, str(wrapper), "train", *BASE, *overrides, f"trainer.max_steps={steps}",
                   f"trainer.resume={resume}", f"trainer.output_dir={run_dir}"]
        # _run writes test_distributed's entry.py (the reward registration) into tmp_path; the wrapper runs it.
        result = _run(command, tmp_path, timeout, {"PYTHONWARNINGS": "ignore", **(env or {})})
        assert result.returncode == 0, f"{steps} steps, resume={resume}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        if resume == "none":
            first_metrics = (run_dir / "metrics.jsonl").read_text()
            state = run_dir / "checkpoints" / "step_000002" / "trainer_state.json"
            first_checkpoint = (state.read_text(), state.stat().st_mtime_ns)
    return CellResult(run_dir, time.time() - started, read_metrics(run_dir / "metrics.jsonl"), first_metrics,
                      first_checkpoint, result.stdout)


def check_cell(result: CellResult) -> None:
    """The checks every cell must pass (see the module docstring)."""
    import yaml

    run = result.run_dir
    assert [r["step"] for r in result.records] == [1, 2, 3]
    for step in (2, 3):
        assert (run / "checkpoints" / f"step_{step:06d}" / "COMPLETE").is_file(), step
    assert (run / "final" / "config.json").is_file()

    # The second launch resumed from the step-2 checkpoint: rank 0 says so (rich wraps long paths: compare without
    # whitespace), steps 1-2's records (timings included) and the step-2 checkpoint are the first launch's, not
    # rewritten, and step 3 trained on the stretch of the prompt stream after the checkpoint's cursor.
    checkpoint = run / "checkpoints" / "step_000002"
    said = "".join(result.resumed_output.split())
    assert f"Resumedfrom{''.join(str(checkpoint).split())}atstep2" in said, result.resumed_output[-3000:]
    metrics = (run / "metrics.jsonl").read_text()  # as text: records may hold NaN, which never equals itself
    assert metrics.startswith(result.first_metrics) and len(metrics.splitlines()) == 3
    state = checkpoint / "trainer_state.json"
    assert (state.read_text(), state.stat().st_mtime_ns) == result.first_checkpoint
    cursor = json.loads(result.first_checkpoint[0])["sampler"]
    prompts = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["prompts_per_step"]
    assert cursor == {"epoch": 0, "position": 2 * prompts}  # two steps' prompts, global over the ranks
    third = result.records[2]
    assert (third["rollout/sampler_start"], third["rollout/sampler_end"]) == (2 * prompts, 3 * prompts)

    for record in result.records:
        assert math.isfinite(record["train/loss"]) and record["train/skipped"] == 0.0, record
        error, seq_kl = record["train/mismatch/token_prob_error"], record["train/mismatch/seq_kl"]
        assert abs(error - 1.0) <= MISMATCH_TOLERANCE, (record["step"], error)
        assert abs(seq_kl) <= SEQ_KL_TOLERANCE, (record["step"], seq_kl)
    assert any(r["train/grad_norm"] > 0 for r in result.records)  # something was trained (and then synced)

    from transformers import AutoModelForCausalLM

    temperature = yaml.safe_load((run / "config.yaml").read_text())["generation"]["temperature"]
    saved = torch.load(run / "trainer_logprobs.pt")
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    ids = torch.tensor(FIXED)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float() / temperature
    hf = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = saved["mask"][:, 1:] > 0
    difference = (hf - saved["logprobs"][:, 1:]).abs()[mask]
    assert difference.numel() == len(FIXED) * (len(FIXED[0]) - PROMPT)
    assert difference.max().item() <= FINAL_TOLERANCE, difference.max().item()


def report(name: str, result: CellResult) -> None:
    """One line per cell in the pytest output (``-s``), for the matrix's cost table."""
    print(f"\n[launch matrix] {name}: {result.seconds:.1f} s", flush=True)
    (result.run_dir.parent / "cell.json").write_text(json.dumps({"cell": name, "seconds": result.seconds}))
