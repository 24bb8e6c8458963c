"""The training loop every offline stage shares, written by hand.

One optimizer step takes `micro_batch_size x grad_accum` examples in a fixed order (a seeded
permutation per epoch), so the data position is just (epoch, offset) and a resumed run sees the
same batches. Each micro-batch loss is divided by the weight (tokens, pairs) of the WHOLE step
before backward: the accumulated gradient is exactly the gradient of the big-batch mean, and
1 x 8 accumulation equals 8 x 1.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from rlhf_cli.config import Config, rule_met, stop_rule
from rlhf_cli.core import distributed as dist
from rlhf_cli.core.errors import CheckpointError, Interrupted, RewardError, TrainingError, UserError
from rlhf_cli.core.progress import Reporter
from rlhf_cli.data.batches import example_length, move, real_tokens
from rlhf_cli.model.load import autocast, eval_mode
from rlhf_cli.trainer import checkpoint as ckpt_lib
from rlhf_cli.trainer import diagnostics
from rlhf_cli.trainer.card import command_line, model_card
from rlhf_cli.trainer.state import (
    Position,
    StopFlag,
    StopRequested,
    check_fingerprint,
    data_fingerprint,
    lr_lambda,
    make_optimizer,
    model_fingerprint,
    next_examples,
    take_optim_settings,
)
from rlhf_cli.trainer.tracking import Trackers


class Stage:
    """A training stage: collates examples and computes a summed loss for one micro-batch.

    `loss` returns (loss_sum, metric_sums): both are sums over the micro-batch in the unit that
    `weight` counts (tokens for SFT, pairs for DPO/RM), so the loop can divide by the weight of
    the whole optimizer step.
    """

    name = "base"
    data_kind = "sft"  # the examples data.build_examples makes: sft, preference, unpaired, prompt
    resumed = False  # set by the loop: this run continues from a checkpoint
    stop_requested = staticmethod(lambda: False)  # set by the loop: a signal asked to stop
    # A few prompt/response/reward rows of the last step (online stages), for TensorBoard/W&B.
    samples: list[dict[str, Any]] = []

    def __init__(self, cfg: Config, model, tokenizer, device: torch.device, amp_dtype):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.device, self.amp_dtype = device, amp_dtype

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def policy_changed(self) -> None:
        """Called after every optimizer update and restore (a rollout engine reloads)."""

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    @property
    def pack(self) -> int | None:
        """The row length of packed batches (train.packing: data.max_length), else None."""
        return self.cfg.data.max_length if self.cfg.train.packing else None

    @property
    def slices(self) -> bool:
        """Packed rows run one forward per sequence (train.packing_attention)."""
        return self.cfg.train.packing_attention == "slices"

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return real_tokens(batch)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def examples_per_step(self) -> int:
        """Examples one step consumes over all ranks (micro_batch_size x grad_accum x ranks)."""
        return self.cfg.train.micro_batch_size * self.cfg.train.grad_accum * dist.world_size()

    def updates_per_step(self) -> int:
        """Optimizer updates one step makes (offline: 1; PPO: epochs x minibatches)."""
        return 1

    def total_steps(self, n_examples: int) -> int:
        """The steps of the run: train.epochs passes over the data, else train.max_steps."""
        t, step_size = self.cfg.train, self.examples_per_step()
        if n_examples < step_size:
            raise UserError(
                f"the training data has {n_examples} examples but one step needs "
                f"{step_size} (train.micro_batch_size x train.grad_accum, or the stage's rollout "
                "batch): lower them or add data"
            )
        return math.ceil(t.epochs * (n_examples // step_size)) if t.epochs else t.max_steps

    def step_examples(self, train_examples: list, pos: Position) -> list:
        """The examples of the next step (advancing `pos`): the next slice of the epoch's
        seeded order. Rejection sampling makes its own (the round's kept samples)."""
        t = self.cfg.train
        lengths = None
        if self.cfg.data.group_by_length:
            if getattr(self, "_lengths", (None,))[0] is not train_examples:
                self._lengths = (train_examples, [example_length(ex) for ex in train_examples])
            lengths = self._lengths[1]
        return next_examples(
            train_examples, pos, self.examples_per_step(), t.seed, t.shuffle, lengths
        )

    def begin_step(self, examples: list) -> None:
        """Work on a whole step's examples (every rank gets all of them) before its
        micro-batches run, e.g. KTO's reference point; also before an evaluation, on its
        examples. Every rank calls it, so it may hold a collective."""

    def train_step(self, examples: list, updater: Updater) -> tuple[dict[str, float], int]:
        """One step on `examples`: (metrics, tokens processed). Offline stages accumulate
        micro-batches into one update; online stages override this with rollout + updates."""
        t = self.cfg.train
        self.begin_step(examples)
        examples = dist.shard(examples)  # this rank's part of the global step
        micro = [
            self.collate(examples[i : i + t.micro_batch_size])
            for i in range(0, len(examples), t.micro_batch_size)
        ]
        # The weight of the whole global step: every micro-batch loss is divided by it.
        counts = torch.tensor(
            [
                sum(self.weight(b) for b in micro),
                sum(self.tokens(b) for b in micro),
                sum(b["input_ids"].numel() for b in micro),
            ]
        )
        weight, tokens, positions = (
            int(x) for x in dist.all_reduce_sum(counts.to(self.device)).tolist()
        )
        loss_total = torch.zeros((), device=self.device)
        totals: dict[str, torch.Tensor] = {}
        for batch in micro:
            with autocast(self.amp_dtype, self.device):
                loss_sum, metrics = self.loss(move(batch, self.device))
            (loss_sum / weight).backward()
            loss_total += loss_sum.detach().float()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0) + v.detach().float()
        if totals:  # summed over ranks with the loss: one collective, one host transfer
            sums = dist.all_reduce_sum(torch.stack([loss_total, *totals.values()]))
            loss_total, values = sums[0], (sums[1:] / weight).tolist()
        else:
            loss_total, values = dist.all_reduce_sum(loss_total), []
        loss, grad_norm = updater.apply(loss_total / weight)
        record = {"loss": loss, "grad_norm": grad_norm}
        record.update(zip(totals, values))
        # The share of the step's forward positions that were padding (train.packing,
        # data.group_by_length and train.pad_to_multiple_of move it).
        record["padding"] = 1 - tokens / positions
        return record, tokens

    def prepare(self, train_examples: list, eval_examples: list, run_dir: Path) -> None:
        """Work done once before the loop (e.g. precomputed reference log-probs)."""

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        """Trainable modules outside the (PEFT) model, e.g. a reward head; saved beside it."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def stop_point(stage: Stage) -> None:
    """Raise StopRequested when a signal asked the run to stop (all ranks agree): called
    between the batches of long work inside a step (evaluation, rollouts, precompute)."""
    flag = float(stage.stop_requested())
    if dist.world_size() > 1:
        flag = dist.all_reduce_max(flag)
    if flag:
        raise StopRequested


@torch.no_grad()
def evaluate(stage: Stage, examples: list, batch_size: int, max_batches: int | None) -> dict:
    if hasattr(stage, "evaluate"):
        return stage.evaluate(examples)
    with eval_mode(stage.model):
        return _evaluate(stage, examples, batch_size, max_batches)


def _evaluate(stage: Stage, examples: list, batch_size: int, max_batches: int | None) -> dict:
    if max_batches is not None:
        examples = examples[: max_batches * batch_size]
    stage.begin_step(examples)  # every rank: a stage's loss holds no collective of its own
    examples = examples[dist.rank() :: dist.world_size()]  # each rank a share, summed below
    totals: dict[str, float] = {}
    steps = -(-len(examples) // batch_size)
    steps = int(dist.all_reduce_max(float(steps)))  # every rank takes each stop point
    for i in range(0, steps * batch_size, batch_size):
        stop_point(stage)
        if i >= len(examples):
            continue
        batch = stage.collate(examples[i : i + batch_size])
        with autocast(stage.amp_dtype, stage.device):
            loss_sum, metrics = stage.loss(move(batch, stage.device))
        parts = {"loss": float(loss_sum), "_weight": float(stage.weight(batch))}
        parts.update({k: float(v) for k, v in metrics.items()})
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
    summed: dict[str, float] = {}
    for part in dist.gather_objects(totals):  # eval is rare: plain objects, any key set
        for k, v in part.items():
            summed[k] = summed.get(k, 0.0) + v
    weight = max(summed.pop("_weight", 0.0), 1.0)
    return {k: v / weight for k, v in summed.items()}


class Updater:
    """One optimizer update from the accumulated gradients: clip, skip it if the loss or the
    gradient is non-finite (counted in `pos`), step, schedule."""

    def __init__(
        self, params, optimizer, scheduler, cfg: Config, pos: Position, owner=None, on_update=None
    ):
        self.params, self.optimizer, self.scheduler = params, optimizer, scheduler
        self.owner = owner  # every module of the run (for `footprint`)
        self.on_update = on_update  # called after each applied update (a stage's rollout engine)
        self.footprint: dict[str, float] | None = None  # this rank's memory at its 1st update
        self.max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        self.max_nonfinite = cfg.train.max_nonfinite
        self.pos = pos
        self.skipped_last = False  # the last step skipped an update
        self.skipped_now = False  # an update of the current step was skipped

    def apply(self, loss: torch.Tensor) -> tuple[float, float]:
        """`loss` must already be the global (all-rank) value; the gradients are summed here."""
        dist.sync_gradients(self.params)
        grad_norm = dist.clip_gradients(self.params, self.max_norm)
        # The one host sync of an update: both numbers decide whether to apply it.
        norm = grad_norm.float().to(loss.device)
        loss_value, norm_value = torch.stack([loss.detach().float(), norm]).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            self.optimizer.step()
            if self.on_update is not None:
                self.on_update()
        else:
            self.skipped_now = True
        if self.footprint is None and self.owner is not None:
            self.footprint = dist.footprint(self.owner, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_value, norm_value

    def end_step(self) -> None:
        """Count the step as skipped when any of its updates was (an online step makes
        several); train.max_nonfinite such steps in a row end the run."""
        self.skipped_last, self.skipped_now = self.skipped_now, False
        if not self.skipped_last:
            self.pos.streak = 0
            return
        self.pos.skipped += 1
        self.pos.streak += 1
        if self.pos.streak >= self.max_nonfinite:
            raise TrainingError(
                f"the loss or gradient was non-finite for {self.pos.streak} steps in a row "
                f"(step {self.pos.step}); lower optim.lr, use train.precision=fp32, or check "
                "the data; the last good checkpoint is kept"
            )

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class Run:
    """One training run's whole state (model, optimizer, schedule, position, the stage's own)
    and what is done to it as a whole: restore it from a checkpoint, save it, and turn a stop
    (a signal, a failing reward function) into a checkpoint and its message. `train` steps it.
    Under FSDP the weights and optimizer state are gathered whole to save and split again on
    restore, so checkpoints look like a single device's."""

    def __init__(self, stage: Stage, train_examples: list, run_dir: Path, config_yaml: str):
        self.stage, self.cfg, self.model = stage, stage.cfg, stage.model
        self.run_dir, self.config_yaml = run_dir, config_yaml
        self.extras = stage.extra_modules()
        modules = (self.model, *self.extras.values())
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if not self.params:
            raise UserError("the model has no trainable parameters (check peft settings)")
        self.fsdp = any(dist.is_sharded(p) for p in self.params)
        if not self.fsdp:
            dist.broadcast_parameters(self.params)  # every rank starts from rank 0's weights
        self.owner = dist.optimized_modules(self.model, self.extras)
        self.total = stage.total_steps(len(train_examples))
        self.optimizer = make_optimizer(self.params, self.cfg.optim)
        schedule = lr_lambda(self.cfg.optim, self.total * stage.updates_per_step())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.pos = Position()
        # Rank 0's (with FSDP each rank holds another shard of the weights).
        self.fingerprint = dist.broadcast_object(
            {"model": model_fingerprint(self.model), "data": data_fingerprint(train_examples)}
        )
        self.stop: StopFlag | None = None
        self.last: dict[str, Any] = {}  # the last step's record and eval (for the model card)
        self.evals: dict[str, Any] = {}

    def updater(self) -> Updater:
        return Updater(
            self.params,
            self.optimizer,
            self.scheduler,
            self.cfg,
            self.pos,
            owner=self.owner,
            on_update=self.stage.policy_changed,
        )

    def restore(self, path: Path) -> None:
        """Continue from the checkpoint at `path`: weights, optimizer, schedule, the stage's
        state, the position in the data and every rank's random state."""
        state = ckpt_lib.load_state(path)
        check_fingerprint(state.get("fingerprint"), self.fingerprint, path, self.cfg.resume_force)
        if self.fsdp != ("trainable" in state):
            raise UserError(
                f"{path} was saved with dist.strategy={'ddp' if self.fsdp else 'fsdp'}: resume "
                "with the same strategy"
            )
        ckpt_lib.load_weights(self.model, path, self.extras, full_state=state.get("trainable"))
        try:
            if self.fsdp:
                dist.load_full_state(
                    self.model, self.owner, self.optimizer, state["trainable"], state["optimizer"]
                )
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            take_optim_settings(self.optimizer, self.scheduler, self.cfg.optim)
        except (ValueError, KeyError) as err:
            raise UserError(
                f"{path}: optimizer state does not fit this run ({err}); was optim.name "
                "or the set of trained parameters changed?"
            ) from err
        saved_world = state.get("world_size", 1)
        if saved_world != dist.world_size():
            raise UserError(
                f"{path} was saved by {saved_world} process(es) and this run has "
                f"{dist.world_size()}: resume with --nproc_per_node={saved_world} (the data order "
                "and each rank's random state depend on it), or start a new run"
            )
        self.stage.load_state_dict(state.get("stage", {}))
        self.stage.policy_changed()
        self.pos = Position(**state["position"])
        ckpt_lib.set_rng_state(state["rng"][dist.rank()] if "world_size" in state else state["rng"])

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds beside the weights' files (a collective)."""
        extra = {}
        if self.fsdp:  # gathered whole: the files look like a single device's
            extra["trainable"] = dist.full_trainable_state(self.model)
        return {
            **extra,
            "optimizer": dist.full_optimizer_state(self.owner, self.optimizer)
            if self.fsdp
            else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "stage": self.stage.state_dict(),
            "position": asdict(self.pos),
            "rng": dist.gather_objects(ckpt_lib.rng_state()),  # one per rank
            "world_size": dist.world_size(),
            "step": self.pos.step,
            "fingerprint": self.fingerprint,
        }

    def save(self, name: str | None = None) -> Path | None:
        """A checkpoint of this step (or `final/`), written by rank 0; every rank calls it."""
        stop = self.stop or StopFlag()
        stop.saving = True  # a second Ctrl-C now waits for the save
        try:
            state = self.state()  # a collective: every rank takes part
            path, failed = None, None
            if dist.is_main():
                try:
                    path = self._write(name, state)
                except CheckpointError as err:  # e.g. a full disk: every rank stops with it
                    failed = str(err)
            failed = dist.broadcast_object(failed)  # (and waits for rank 0's write)
            if failed:
                raise CheckpointError(failed)
        finally:
            stop.saving = False
        return path

    def _write(self, name: str | None, state: dict[str, Any]) -> Path:
        card = None
        if name == "final":
            kind = "adapter" if ckpt_lib.is_peft(self.model) else "full"
            card = model_card(
                self.cfg, self.config_yaml, kind, self.last, self.evals, command_line()
            )
        return ckpt_lib.save_checkpoint(
            self.run_dir,
            self.pos.step,
            self.model,
            state,
            self.config_yaml,
            self.cfg.train.keep_last,
            self.stage.tokenizer if name else None,
            name,
            self.extras,
            card,
        )

    def rewind(self, pos: Position, rng: Any) -> None:
        """Back to the start of a step that raised before any update (it runs again)."""
        for key, value in asdict(pos).items():
            setattr(self.pos, key, value)
        ckpt_lib.set_rng_state(rng)

    def interrupted(self, signum: int) -> Interrupted:
        path = self.save()
        name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
        return Interrupted(
            f"{name}: stopped at step {self.pos.step}/{self.total}; checkpoint {path}. "
            f"Continue with: rlhf train ... run_dir={self.run_dir} resume=auto",
            128 + signum,
        )

    def reward_failed(self, err: RewardError) -> UserError:
        path = self.save()
        return UserError(
            f"{err} (checkpoint {path} at step {self.pos.step}/{self.total}: fix it, "
            f"then rlhf train ... run_dir={self.run_dir} resume=auto)"
        )


def train(
    stage: Stage,
    train_examples: list,
    eval_examples: list,
    *,
    run_dir: Path,
    config_yaml: str,
    resume_from: Path | None,
    stop: StopFlag | None = None,
) -> dict[str, Any]:
    """Run the loop to the end (or to a signal); returns the summary rows. `stop`: the
    caller's signal handler, when it installed one before (e.g. around model loading)."""
    t = stage.cfg.train
    run = Run(stage, train_examples, run_dir, config_yaml)
    if resume_from is not None:
        run.restore(resume_from)
    pos, total = run.pos, run.total
    updater = run.updater()
    model = stage.model
    model.train()
    if hasattr(model, "config"):
        model.config.use_cache = False
    start_step, t0 = pos.step, time.perf_counter()
    trackers = None
    if dist.is_main() and (stage.cfg.log.tensorboard or stage.cfg.log.wandb):
        resumed_at = pos.step if resume_from is not None else None
        trackers = Trackers(stage.cfg.log, run_dir, config_yaml, stage.name, resumed_at)
    reporter = Reporter(run_dir, total, pos.step, resume_from is not None, dist.is_main(), trackers)

    def evaluated() -> dict:
        return evaluate(stage, eval_examples, t.micro_batch_size, t.eval_batches)

    stage.resumed = resume_from is not None
    history: list[dict[str, Any]] = []  # this run's train records, for the diagnostics
    noted: dict[str, str] = {}
    max_new = getattr(stage.cfg.stage, "max_new_tokens", 0)
    with reporter as report, nullcontext(stop) if stop else StopFlag() as stop:
        run.stop = stop
        stage.stop_requested = lambda: bool(stop.signum)

        def stopped() -> Interrupted:  # a StopRequested: saved at the signal's step
            return run.interrupted(stop.signum or signal.SIGINT)

        if eval_examples and t.eval_on_start and pos.step == 0:
            try:
                report.eval(0, evaluated())
            except StopRequested:  # nothing trained yet: stop as before the first step
                raise stopped() from None
        rule = stop_rule(t)
        evaluated_at = None
        while pos.step < total:
            history.append(one_step(run, updater, train_examples, report, stopped, start_step))
            for kind, text in diagnostics.notes(stage.name, history, max_new).items():
                if kind not in noted:  # each kind once, when first seen
                    noted[kind] = text
                    report.note(f"[yellow]note (step {pos.step}):[/] {text}")
            if eval_examples and t.eval_every and pos.step % t.eval_every == 0 and pos.step < total:
                try:
                    run.evals = evaluated()
                except StopRequested:  # the eval is dropped; the step is saved
                    raise stopped() from None
                report.eval(pos.step, run.evals)
                evaluated_at = pos.step
            if rule is not None and early_stop(rule, run, report):
                break
            if t.save_every and pos.step % t.save_every == 0 and pos.step < total:
                run.save()
            # Every rank stops at the same step when any of them got the signal.
            signum = int(dist.all_reduce_max(float(stop.signum or 0)))
            if signum:
                raise run.interrupted(signum)
        if eval_examples and start_step < total and evaluated_at != pos.step:
            try:
                run.evals = evaluated()
            except StopRequested:
                raise stopped() from None
            report.eval(pos.step, run.evals)
        run.save()
        final = run.save("final")
    return summary(run, time.perf_counter() - t0, start_step, noted, final)


def early_stop(rule: tuple[bool, str, str, float], run: Run, report) -> bool:
    """train.stop_metric's target reached by the last evaluation (eval/...) or training step:
    say so."""
    on_eval, metric, op, target = rule
    value = rule_met(rule, run.evals if on_eval else run.last)
    if value is None:
        return False
    name = f"eval {metric}" if on_eval else metric
    report.note(
        f"early stop at step {run.pos.step}: {name} {value:.4g} {op} {target:g} (train.stop_when)"
    )
    return True


def one_step(
    run: Run, updater: Updater, train_examples: list, report, stopped, start_step: int
) -> dict[str, Any]:
    """One training step: the stage's examples, its train_step, the position moved on, the
    record logged (and returned). A reward that fails or a signal before any update rewinds
    to the start of the step, which the checkpoint then holds (it runs again on resume)."""
    stage, pos, t = run.stage, run.pos, run.stage.cfg.train
    step_t0 = time.perf_counter()
    before = replace(pos), ckpt_lib.rng_state()
    try:
        examples = stage.step_examples(train_examples, pos)
    except StopRequested:  # a signal during the stage's own long work (sampling)
        raise stopped() from None
    except RewardError as err:  # rs: its sampling resumes from the saved batches
        raise run.reward_failed(err) from None
    try:
        record, tokens = stage.train_step(examples, updater)
    except (RewardError, StopRequested) as err:
        # Raised before any update (scoring, or a signal during the rollouts): the
        # checkpoint is the state at the start of the step, which runs again on resume.
        run.rewind(*before)
        if isinstance(err, StopRequested):
            raise stopped() from None
        raise run.reward_failed(err) from None
    pos.step += 1
    pos.tokens += tokens
    updater.end_step()
    elapsed = time.perf_counter() - step_t0
    run.last = last = {
        **record,
        "lr": updater.lr,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "epoch": pos.epoch + pos.offset / max(1, len(train_examples)),
        "skipped": pos.skipped,
    }
    if pos.step == start_step + 1 and updater.footprint:  # this rank's, once a run
        last.update(updater.footprint)
    if updater.skipped_last:
        report.note(f"step {pos.step}: non-finite loss/gradient, step skipped")
    logged = pos.step % t.log_every == 0 or pos.step == run.total
    report.step(pos.step, last, log=logged)
    if logged and stage.samples:
        report.samples(pos.step, stage.samples)
    return last


def summary(
    run: Run, elapsed: float, start_step: int, noted: dict[str, str], final: Path | None
) -> dict[str, Any]:
    """The rows of the table a run ends with."""
    stage, pos = run.stage, run.pos
    trained_steps = pos.step - start_step
    return {
        "stage": stage.name,
        "steps": f"{pos.step} ({trained_steps} this run)",
        "final loss": run.last.get("loss", float("nan")),
        **{f"final {k}": run.last[k] for k in ("score", "kl") if k in run.last},
        **{f"eval {k}": v for k, v in run.evals.items()},
        "skipped steps": pos.skipped,
        **({"notes": ", ".join(noted)} if noted else {}),
        "time": f"{elapsed:.1f}s",
        "tokens/s": round(pos.tokens / elapsed) if trained_steps else 0,
        "peak memory": peak_memory(stage.device),
        "run dir": str(run.run_dir),
        "adapter" if ckpt_lib.is_peft(stage.model) else "model": str(final),
    }


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA allocated)"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return f"{rss_bytes / 2**30:.2f} GiB (peak RSS)"
