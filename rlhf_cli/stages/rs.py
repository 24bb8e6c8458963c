"""Stage rs: rejection sampling (best-of-n fine-tuning; Touvron et al. 2023, the Llama 2 recipe).

Each round: sample `stage.n` completions per prompt from the current policy (KV cache), score
them with reward.model or reward.fn, keep the best one per prompt (select=best) or the top
fraction of all the round's completions (select=top), then fine-tune on the kept ones with the
SFT loss (response tokens only) for `stage.epochs` passes. The next round samples from the
policy this one trained.

What a round sampled is written to the run directory, `rounds/round-<r>.jsonl`: one line per
prompt with every completion, its score, whether it ended with EOS and whether it was kept.
While a round samples, finished generation batches go to `round-<r>.partial.jsonl`, so a
stopped run (a signal saves a checkpoint at once, between two batches) resumes the sampling
where it stopped; a run resumed in the middle of a round's training reads the round's file
back instead of sampling again. Each generation batch draws from its own seeded random
stream, so a resumed round samples exactly what an uninterrupted one would.

A step is one optimizer update of the SFT phase; a round has
floor(kept x stage.epochs / step size) of them, so the run's length is known in advance.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from rlhf_cli.core import distributed as dist
from rlhf_cli.core.errors import RewardError, UserError
from rlhf_cli.core.progress import console
from rlhf_cli.data.examples import SFTExample
from rlhf_cli.losses import IGNORE_INDEX
from rlhf_cli.model.forward import is_fsdp
from rlhf_cli.model.load import eval_mode
from rlhf_cli.rollout.engine import generation_config
from rlhf_cli.rollout.sampler import Sampler, pooled_means
from rlhf_cli.stages.sft import SFTStage
from rlhf_cli.trainer.loop import stop_point
from rlhf_cli.trainer.state import Position, StopRequested, epoch_order

ROUNDS_DIR = "rounds"


def round_file(run_dir: Path, r: int, partial: bool = False) -> Path:
    """rounds/round-<r>.jsonl (r counts from 1), or its .partial.jsonl while it samples."""
    return run_dir / ROUNDS_DIR / f"round-{r}{'.partial' if partial else ''}.jsonl"


def select_kept(rows: list[dict], select: str, top_fraction: float, penalty: float) -> int:
    """Mark `kept` on the samples of `rows` (in place); returns how many were kept. A sample's
    merit is its score minus `penalty` when it did not end with EOS; ties keep the earlier one.
    best: one per prompt; top: the best round(top_fraction x all samples) (at least 1)."""

    def merit(sample: dict) -> float:  # a non-finite score is never preferred
        score = sample["score"] if math.isfinite(sample["score"]) else -math.inf
        return score - (0.0 if sample["ended"] else penalty)

    for row in rows:
        for sample in row["samples"]:
            sample["kept"] = False
    if select == "best":
        for row in rows:
            best = max(range(len(row["samples"])), key=lambda j: (merit(row["samples"][j]), -j))
            row["samples"][best]["kept"] = True
        return len(rows)
    flat = [sample for row in rows for sample in row["samples"]]
    count = kept_count(len(flat), "top", top_fraction, 1)
    # sorted() is stable: among equal merits the earlier sample comes first.
    for sample in sorted(flat, key=merit, reverse=True)[:count]:
        sample["kept"] = True
    return count


def kept_count(prompts: int, select: str, top_fraction: float, n: int) -> int:
    """How many samples a round of `prompts` prompts (n samples each) keeps."""
    return prompts if select == "best" else max(1, round(top_fraction * prompts * n))


def read_rows(path: Path) -> list[dict]:
    """The complete lines of a JSONL file (a torn last line, from a killed run, is dropped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """One write of whole lines, flushed to disk: a batch is in the file or it is not."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(row) + "\n" for row in rows))
        fh.flush()
        os.fsync(fh.fileno())


class RSStage(Sampler, SFTStage):
    name = "rs"
    data_kind = "prompt"

    def __init__(self, cfg, model, tokenizer, device, amp_dtype):
        super().__init__(cfg, model, tokenizer, device, amp_dtype)
        s = cfg.stage
        if s.rollout_batch_size % dist.world_size():
            raise UserError(
                f"stage.rollout_batch_size={s.rollout_batch_size} is global: it must divide by "
                f"the {dist.world_size()} ranks"
            )
        self._setup_reward()
        self.generation = generation_config(
            tokenizer, s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.min_p
        )
        self.greedy = generation_config(tokenizer, s.max_new_tokens)
        self.setup_engine()
        self.prompts: list[dict] = []
        self.run_dir = Path(".")
        self.loaded: tuple[int, list[SFTExample]] | None = None  # (round, its kept examples)
        self.round_stats: dict[str, float] = {}  # logged with the round's first step
        self.cleaned = False

    # -- the plan ------------------------------------------------------------------------------

    def prepare(self, train_examples: list, eval_examples: list, run_dir: Path) -> None:
        self.prompts, self.run_dir = train_examples, run_dir

    def prompts_per_round(self) -> int:
        return self.cfg.stage.prompts_per_round or len(self.prompts)

    def kept_per_round(self) -> int:
        s = self.cfg.stage
        return kept_count(self.prompts_per_round(), s.select, s.top_fraction, s.n)

    def steps_per_round(self) -> int:
        return self.kept_per_round() * self.cfg.stage.epochs // self.examples_per_step()

    def total_steps(self, n_examples: int) -> int:
        s, size = self.cfg.stage, self.examples_per_step()
        if self.kept_per_round() * s.epochs < size:
            raise UserError(
                f"stage=rs keeps {self.kept_per_round()} samples a round ({s.epochs} epoch(s)) but "
                f"one step needs {size} (train.micro_batch_size x train.grad_accum x ranks): "
                "lower those, or raise stage.prompts_per_round / stage.top_fraction / "
                "stage.epochs"
            )
        return s.rounds * self.steps_per_round()

    def round_prompt_indices(self, r: int) -> list[int]:
        """The prompts of round r (0-based): the next prompts_per_round of a seeded shuffle
        (every prompt each round when prompts_per_round is null)."""
        n, per = len(self.prompts), self.prompts_per_round()
        if per == n and not self.cfg.stage.prompts_per_round:
            return list(range(n))
        seed, out = self.cfg.train.seed, []
        for i in range(r * per, (r + 1) * per):
            epoch, offset = divmod(i, n)
            out.append(epoch_order(n, epoch, seed, True)[offset])
        return out

    # -- the step's examples -------------------------------------------------------------------

    def step_examples(self, train_examples: list, pos: Position) -> list:
        r, k = divmod(pos.step, self.steps_per_round())
        if not self.cleaned:
            self.drop_stale_rounds(r)
            self.cleaned = True
        if self.loaded is None or self.loaded[0] != r:
            self.loaded = (r, self.round_examples(r))
        kept = self.loaded[1]
        size, seed = self.examples_per_step(), self.cfg.train.seed
        # The round's kept samples in seeded order, stage.epochs passes end to end.
        order = [
            i
            for e in range(self.cfg.stage.epochs)
            for i in epoch_order(len(kept), e, seed * 7919 + r, self.cfg.train.shuffle)
        ]
        pos.epoch, pos.offset = r, 0  # for rs, the record's "epoch" counts rounds
        return [kept[i] for i in order[k * size : (k + 1) * size]]

    def drop_stale_rounds(self, current: int) -> None:
        """A fresh run starts with no round files; a resumed one keeps those up to its current
        round (made by the same policy) and drops later ones (a future it will sample again)."""
        if dist.is_main() and (self.run_dir / ROUNDS_DIR).is_dir():
            for path in (self.run_dir / ROUNDS_DIR).glob("round-*.jsonl"):
                number = path.name.removeprefix("round-").split(".")[0]
                if not self.resumed or not number.isdigit() or int(number) > current + 1:
                    path.unlink()
        dist.barrier()

    def round_examples(self, r: int) -> list[SFTExample]:
        """Round r's kept samples as SFT examples: read from its file, else sampled now."""
        done = round_file(self.run_dir, r + 1)
        rows = dist.broadcast_object(read_rows(done) if dist.is_main() else None)
        if not rows:
            rows = self.sample_round(r)
        else:
            console.print(f"rs round {r + 1}: read {done} (sampled before the resume)")
        indices = self.round_prompt_indices(r)
        if [row["prompt_index"] for row in rows] != indices:
            raise UserError(
                f"{done} does not hold round {r + 1}'s prompts (the data or stage settings "
                "changed since it was written): resume with the run's own settings, or start "
                "a new run"
            )
        examples = []
        for row in rows:
            prompt = self.prompts[row["prompt_index"]]["prompt_ids"]
            for sample in row["samples"]:
                if sample["kept"]:
                    response = sample["ids"][: max(1, self.cfg.data.max_length - len(prompt))]
                    examples.append(
                        SFTExample(
                            input_ids=prompt + response,
                            labels=[IGNORE_INDEX] * len(prompt) + response,
                        )
                    )
        if len(examples) != self.kept_per_round():
            raise UserError(
                f"{done} keeps {len(examples)} samples where stage.select={self.cfg.stage.select} "
                f"keeps {self.kept_per_round()}: resume with the run's own settings, or start a "
                "new run"
            )
        return examples

    def sample_round(self, r: int) -> list[dict]:
        """Sample, score and select round r (0-based), resuming a partial file; rank 0 writes
        the round's file. Every rank returns all rows."""
        s = self.cfg.stage
        indices = self.round_prompt_indices(r)
        partial = round_file(self.run_dir, r + 1, partial=True)
        if dist.is_main():
            partial.parent.mkdir(parents=True, exist_ok=True)
        batch = s.rollout_batch_size
        rows = dist.broadcast_object(read_rows(partial) if dist.is_main() else None)
        rows = rows[: len(rows) // batch * batch]  # whole generation batches only
        if [row["prompt_index"] for row in rows] != indices[: len(rows)]:
            rows = []  # not this round's prompts: sample afresh
            if dist.is_main():
                partial.unlink(missing_ok=True)
        if rows:
            console.print(
                f"rs round {r + 1}: {len(rows)} of {len(indices)} prompts already sampled "
                f"({partial})"
            )
        t0, synced = time.perf_counter(), 0.0
        for start in range(len(rows), len(indices), batch):
            if dist.all_reduce_max(float(self.stop_requested())):
                raise StopRequested
            self.sync_seconds = 0.0
            new = self.sample_batch(r, start // batch, indices[start : start + batch])
            synced += self.sync_seconds
            if dist.is_main():
                append_rows(partial, new)
            rows += new
        self.engine.release()  # (vllm on CUDA) the round's SFT gets the engine's memory
        kept = select_kept(rows, s.select, s.top_fraction, s.missing_eos_penalty)
        samples = [sample for row in rows for sample in row["samples"]]
        chosen = [sample for sample in samples if sample["kept"]]

        def mean(values: list[float]) -> float:
            return sum(values) / max(len(values), 1)

        self.round_stats = {
            "round": r + 1,
            "round/score": mean([x["score"] for x in samples]),
            "round/kept_score": mean([x["score"] for x in chosen]),
            "round/eos_fraction": mean([float(x["ended"]) for x in samples]),
            "round/kept_length": mean([float(len(x["ids"])) for x in chosen]),
            "round/sample_s": time.perf_counter() - t0,
        }
        if self.engine.name != "hf":  # the policy's reload into the engine, in sample_s
            self.round_stats["rollout/sync_s"] = synced
        console.print(
            f"rs round {r + 1}/{s.rounds}: {len(rows)} prompts x {s.n} samples; mean score "
            f"{self.round_stats['round/score']:.4f}, the {kept} kept "
            f"{self.round_stats['round/kept_score']:.4f} "
            f"({self.round_stats['round/sample_s']:.0f}s)"
        )
        if dist.is_main():
            done = round_file(self.run_dir, r + 1)
            tmp = done.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
            os.replace(tmp, done)
            partial.unlink(missing_ok=True)
        dist.barrier()
        return rows

    @torch.no_grad()
    def sample_batch(self, r: int, b: int, indices: list[int]) -> list[dict]:
        """n samples for each prompt of generation batch b of round r, scored; every rank
        samples its share from its own seeded stream and all get every row."""
        s = self.cfg.stage
        mine = indices[dist.rank() :: dist.world_size()]
        rows, error = [], None
        # Under FSDP every forward is a collective: a rank without prompts in this (last,
        # short) batch samples a stand-in prompt in step with the others and keeps nothing.
        stand_in = not mine and is_fsdp(self.model)
        if mine or stand_in:
            examples = [self.prompts[i] for i in mine or indices[:1]]
            devices = [self.device] if self.device.type == "cuda" else []
            seed = ((self.cfg.train.seed * 1_000_003 + r) * 100_003 + b) * 101 + dist.rank()
            with torch.random.fork_rng(devices=devices), eval_mode(self.model):
                torch.manual_seed(seed)
                rollout = self.rollout(examples, k=s.n)
                try:
                    scores = self.scores(rollout).tolist()
                except RewardError as err:  # every rank stops (below), with this message
                    error, mine = str(err), []
                if stand_in:
                    mine = []
            for j, i in enumerate(mine):
                samples = []
                for q in range(j * s.n, (j + 1) * s.n):
                    ids = rollout.responses[q]
                    samples.append(
                        {
                            "completion": self.tokenizer.decode(ids, skip_special_tokens=True),
                            "score": scores[q],
                            "ended": bool(rollout.ended[q]),
                            "kept": False,  # select_kept decides, once the round is sampled
                            "ids": ids,
                        }
                    )
                rows.append(
                    {
                        "prompt_index": i,
                        "prompt": self.prompts[i]["prompt_text"],
                        "samples": samples,
                    }
                )
        parts = dist.gather_objects((rows, error))
        errors = [e for _, e in parts if e]
        if errors:
            raise RewardError(errors[0])
        # Rank k sampled positions k, k + N, ... of the batch: put each row back at its
        # position (not by its prompt: a round may hold a prompt twice).
        out: list[dict] = [None] * len(indices)  # type: ignore[list-item]
        for k, (part, _) in enumerate(parts):
            out[k :: dist.world_size()] = part
        return out

    def train_step(self, examples: list, updater) -> tuple[dict[str, float], int]:
        record, tokens = super().train_step(examples, updater)
        record.update(self.round_stats)
        self.round_stats = {}
        return record, tokens

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, examples: list) -> dict[str, float]:
        """Greedy completions of the eval prompts: their mean score, length and EOS fraction."""
        s = self.cfg.stage
        mine = examples[dist.rank() :: dist.world_size()]
        scores, lengths, ended = [], [], []
        size = s.rollout_batch_size
        batches = int(dist.all_reduce_max(float(-(-len(mine) // size))))
        lockstep = is_fsdp(self.model)
        with eval_mode(self.model):
            for i in range(0, batches * size, size):
                stop_point(self)  # every rank takes each stop point
                part = mine[i : i + size]
                if not part and not lockstep:
                    continue
                # FSDP: a rank out of prompts runs a stand-in in step and keeps nothing.
                rollout = self.rollout(part or examples[:1], 1, self.greedy)
                batch_scores = self.scores(rollout).tolist()
                if not part:
                    continue
                scores += batch_scores
                lengths += rollout.mask.sum(-1).tolist()
                ended += rollout.ended.tolist()
        self.engine.release()
        return pooled_means(
            {"greedy_score": scores, "response_length": lengths, "eos_fraction": ended}
        )
