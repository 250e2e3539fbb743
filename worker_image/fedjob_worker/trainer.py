"""Local training with DeepSpeed ZeRO on this silo's processes, one live engine for the whole job.

The model is loaded and the engine built once. Each round writes the new global
trainable state into the live engine, both into the parameters the forward pass
reads and into the optimizer's fp32 master copies (written alone, the masters
would silently undo it at the next step), and resets the optimizer's state, so
every round starts from the global model with a fresh local optimizer, as FedAvg
assumes, without reloading the base model from disk.

On a GPU everything in the step loop stays on the rank's device: batches go up,
nothing comes back until the round's mean loss and the trained state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedjob import modeling
from fedjob.chunking import State, TensorInfo
from fedjob.silo_data import silo_data
from fedjob.spec import FederatedJob
from fedjob.windows import TrainingData
from fedjob_worker.build_locks import StaleLockWatch, extensions_dir

log = logging.getLogger("fedjob.worker")


def init_distributed(rank: int, world_size: int, master_port: int, local_rank: int | None = None) -> None:
    """The silo's process group: NCCL on GPUs, gloo on CPU.

    The env variables stop DeepSpeed from trying MPI discovery. On a GPU the rank pins its
    device (LOCAL_RANK) before the first collective: NCCL otherwise guesses from the global
    rank, and two ranks on one GPU are refused.
    """
    local = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local),
        LOCAL_SIZE=os.environ.get("LOCAL_SIZE", str(world_size)),
        MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        MASTER_PORT=str(master_port),
    )
    import deepspeed
    import torch

    cuda = _has_cuda()
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {rank} needs GPU {local}, this pod has {torch.cuda.device_count()}: "
                "a silo's processes must not exceed its GPUs"
            )
        torch.cuda.set_device(local)
    # On CPU this builds (once, into the shared cache) DeepSpeed's shm op, under a lock file.
    with StaleLockWatch(extensions_dir()):
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    _unlink_shm_buffer(rank)


def _unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's name for DeepSpeed's CPU shared-memory all-reduce buffer (66 MiB).

    DeepSpeed never unlinks it, so every silo process start left one in /dev/shm
    until the machine (or the pod's shm) filled up. Once every rank has mapped its
    peers' buffers (init returns only then; the barrier makes sure for all ranks),
    the name is not needed: the mappings live on until the process exits.
    """
    import torch.distributed as dist

    dist.barrier()
    where = f"{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}"
    # Missing when this accelerator (GPU) or machine has no shm op.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{where}_{rank}")


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def deepspeed_config(job: FederatedJob, world_size: int) -> dict[str, Any]:
    t = job.spec.training
    ds = t.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_parameters:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.batch_size * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        # We pass a torch optimizer: no FusedAdam / CPU-Adam compilation (75-100 s on CPU).
        "zero_force_ds_cpu_optimizer": False,
        # ZeRO partitions any element-wise optimizer correctly; DeepSpeed only vouches for its own list.
        "zero_allow_untested_optimizer": t.optimizer == "sgd",
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


@dataclass
class RoundResult:
    state: State  # trainable parameters after training (on rank 0; empty on the others)
    train_loss: float
    steps: int
    extras: State = field(default_factory=dict)  # tensors the algorithm sends back (SCAFFOLD's c_i)


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean over this silo's held-out windows
    samples: int  # windows evaluated, over all ranks: the silo's weight in the federated mean


def _torch_optimizer(opt: Any) -> Any:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16), which hold it as `.optimizer`."""
    import torch

    while not isinstance(opt, torch.optim.Optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            raise TypeError(f"no torch optimizer inside {type(opt).__name__}")
        opt = inner
    return opt


class LocalTrainer:
    def __init__(self, job: FederatedJob, silo: str, rank: int, world_size: int) -> None:
        self.job = job
        self.silo = silo
        self.rank = rank
        self.world_size = world_size
        spec = job.silo(silo)
        t = job.spec.training
        self.data, held_out = silo_data(job, silo)
        self.num_samples = self.data.num_samples()
        self.local_steps = spec.local_steps or t.local_steps
        self.eval_batches = _eval_batches(job, held_out, rank, world_size)
        self.eval_samples = 0 if held_out is None else job.spec.evaluation.batches * t.batch_size * world_size
        self.engine: Any = None
        self._named: list[tuple[str, Any]] = []
        self._optimizer: Any = None
        self._fresh_steps: dict[int, Any] = {}

    # ----- the live engine -------------------------------------------------------------------------

    def _build(self) -> None:
        """Load the model and build the engine: once per process, not once per round."""
        import deepspeed
        import torch

        t = self.job.spec.training
        dtype = torch.bfloat16 if t.deepspeed.bf16 else None
        model = modeling.build_model(self.job, dtype=dtype)
        params = [p for _, p in modeling.trainable_parameters(model)]
        optimizer: torch.optim.Optimizer
        if t.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(self.job, self.world_size)
        )
        self._named = modeling.trainable_parameters(self.engine.module)
        self._optimizer = _torch_optimizer(self.engine.optimizer)
        # What a fresh optimizer holds: nothing (lazy state), or, under ZeRO-3, states that
        # DeepSpeed initialised with one zero-gradient step. Remember the step counts.
        self._fresh_steps = {
            id(p): (st["step"].clone() if hasattr(st.get("step"), "clone") else st.get("step"))
            for p, st in self._optimizer.state.items()
        }

    def manifest(self) -> dict[str, TensorInfo]:
        """The trainable tensors' names and full shapes (also under ZeRO-3 partitioning)."""
        if self.engine is None:
            self._build()
        return {
            n: TensorInfo(n, tuple(int(d) for d in getattr(p, "ds_shape", p.shape))) for n, p in self._named
        }

    def manifest_state(self) -> State:
        """The live model's trainable tensors (collective under ZeRO-3: every rank calls it)."""
        if self.engine is None:
            self._build()
        return self._gather_state()

    def load_global(self, state: State) -> None:
        """Write the global trainable state into the live engine and start a fresh local optimizer.

        Collective under ZeRO-3 (the partitioned parameters are gathered to be written).
        """
        import deepspeed
        import torch
        from deepspeed.utils import safe_set_full_fp32_param

        if self.engine is None:
            self._build()
        device = self.engine.device
        with torch.no_grad():
            for name, p in self._named:
                value = torch.from_numpy(np.ascontiguousarray(state[name])).to(device)
                # The optimizer's fp32 master copy (ZeRO 1-3, bf16): the next step writes it back.
                safe_set_full_fp32_param(p, value)
                # The parameter the forward pass reads (partitioned under ZeRO-3).
                if hasattr(p, "ds_id"):
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        if self.rank == 0:
                            p.data.copy_(value.reshape(p.shape).to(p.dtype))
                else:
                    p.data.copy_(value.reshape(p.shape).to(p.dtype))
        self._reset_optimizer()

    def _reset_optimizer(self) -> None:
        """Zero the moments in place (no reallocation) and put the step counts back."""
        import torch

        opt = self._optimizer
        for p in list(opt.state):
            st = opt.state[p]
            if id(p) not in self._fresh_steps:
                del opt.state[p]  # lazily initialised: absent is fresh
                continue
            for key, value in st.items():
                if key == "step":
                    fresh = self._fresh_steps[id(p)]
                    if isinstance(value, torch.Tensor):
                        value.copy_(fresh)
                    else:
                        st[key] = fresh
                elif isinstance(value, torch.Tensor):
                    value.zero_()

    # ----- a round ---------------------------------------------------------------------------------

    def train(
        self,
        round_number: int,
        global_state: State,
        extras: State | None = None,
        load: bool = True,
        on_step: Callable[[int, int], None] | None = None,
    ) -> RoundResult:
        """`load=False`: the caller already loaded `global_state` (load_global) and ran nothing
        but evaluation since. `on_step(done, total)` after each local step (progress reports)."""
        import torch
        import torch.distributed as dist

        t = self.job.spec.training
        if load:
            self.load_global(global_state)
        engine = self.engine
        engine.train()
        # Different windows (and dropout masks) on every rank, silo and round, reproducible
        # from the job's seed whatever happened in earlier rounds.
        key = [t.seed, round_number, self.rank, *self.silo.encode()]
        rng = np.random.default_rng(key)
        torch.manual_seed(zlib.crc32(np.asarray(key, dtype=np.int64).tobytes()))
        adjust = GradientAdjustment.for_job(self.job, global_state, extras or {}, engine.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
        for step in range(self.local_steps):
            if on_step is not None:
                on_step(step, self.local_steps)
            batch = self.data.random_batch(rng, t.batch_size).model_inputs(engine.device)
            loss = engine(**batch).loss
            loss_sum += loss.detach().float()  # the data loss, comparable across algorithms
            engine.backward(loss)
            if adjust is not None:
                adjust.apply(self._named)
            engine.step()
        mean = loss_sum / self.local_steps
        dist.all_reduce(mean)
        # Every rank takes part in the gather (collective under ZeRO-3); only rank 0 uploads,
        # so only rank 0 keeps a host copy of the trained state.
        state = self._gather_state(keep=self.rank == 0)
        out = adjust.result(self.local_steps) if adjust is not None else {}
        return RoundResult(state, float(mean.item()) / self.world_size, self.local_steps, out)

    def evaluate(self) -> Evaluation | None:
        """The live model's loss on this silo's held-out text (after load_global: the global model's).

        Every rank evaluates its share of the windows, on its own device; collective.
        """
        import torch
        import torch.distributed as dist

        if self.eval_samples == 0:
            return None
        if self.engine is None:
            self._build()
        engine = self.engine
        engine.eval()
        total = torch.zeros((), dtype=torch.float32, device=engine.device)
        with torch.no_grad():
            for b in self.eval_batches:
                total += engine(**b.model_inputs(engine.device)).loss.float()
        total /= max(len(self.eval_batches), 1)
        dist.all_reduce(total)
        engine.train()
        return Evaluation(float(total.item()) / self.world_size, self.eval_samples)

    def _gather_state(self, keep: bool = True) -> State:
        """Full fp32 trainable parameters (empty where not `keep`). Collective: every rank calls it."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out: State = {}
        for name, p in self._named:
            value = safe_get_full_fp32_param(p)
            if value is None:  # no ZeRO optimizer owns it (stage 0 in fp32)
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    value = p.detach().clone()
            if keep:
                out[name] = value.detach().float().cpu().numpy()
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None


def _eval_batches(job: FederatedJob, held_out: TrainingData | None, rank: int, world: int) -> list[Any]:
    """This rank's share of the fixed held-out windows: the same windows every round."""
    if held_out is None:
        return []
    t = job.spec.training
    n = job.spec.evaluation.batches
    batches = held_out.fixed_batches(n * world, t.batch_size)
    return batches[rank * n : (rank + 1) * n]


class GradientAdjustment:
    """What a client-side algorithm adds to each step's gradient, between backward and step.

    FedProx: + mu (w - w_global), the gradient of mu/2 ||w - w_global||^2.
    SCAFFOLD: + (c - c_i); the raw gradients are averaged into the silo's new c_i.
    Working on gradients through DeepSpeed's safe_get/set_full_grad (rather than on the
    loss) is what makes both correct under every ZeRO stage, including ZeRO-3 where
    parameters are partitioned outside forward. Those calls are collective: every rank
    makes them, for every trainable tensor, in the same order.
    """

    def __init__(self, mu: float, anchor: State, correction: State | None, device: Any = "cpu") -> None:
        import torch

        # Everything on the rank's device: the step loop never copies through the host.
        self.mu = mu
        self.shapes = {n: v.shape for n, v in anchor.items()}
        self.anchor = {n: torch.from_numpy(v).to(device) for n, v in anchor.items()} if mu > 0 else {}
        self.correction = {n: torch.from_numpy(v).to(device) for n, v in (correction or {}).items()}
        self.grad_sum = (
            {n: torch.zeros(v.shape, dtype=torch.float32, device=device) for n, v in anchor.items()}
            if correction is not None
            else None
        )

    @classmethod
    def for_job(
        cls, job: FederatedJob, global_state: State, extras: State, device: Any = "cpu"
    ) -> GradientAdjustment | None:
        from fedjob.aggregation import Scaffold

        agg = job.spec.aggregation
        if agg.algorithm == "fedprox" and agg.proximal_mu > 0:
            return cls(agg.proximal_mu, global_state, None, device)
        if agg.algorithm == "scaffold":
            p = Scaffold.CORRECTION
            correction = {n: extras[p + n] for n in global_state}
            return cls(0.0, global_state, correction, device)
        return None

    def apply(self, named: list[tuple[str, Any]]) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_set_full_grad

        for name, p in named:
            grad = safe_get_full_grad(p)
            if grad is None:
                continue
            shape = self.shapes[name]
            raw = grad.detach().float().reshape(shape)
            if self.grad_sum is not None:
                self.grad_sum[name] += raw
            new = raw
            if self.mu > 0:
                w32 = safe_get_full_fp32_param(p)
                w = (p if w32 is None else w32).detach().float().reshape(shape)
                new = new + self.mu * (w - self.anchor[name].to(w.device))
            if name in self.correction:
                new = new + self.correction[name].to(new.device)
            safe_set_full_grad(p, new.reshape(grad.shape).to(dtype=grad.dtype, device=grad.device))

    def result(self, steps: int) -> State:
        """SCAFFOLD's new c_i: the round's mean raw gradient (gradient units, whatever the optimiser)."""
        from fedjob.aggregation import Scaffold

        if self.grad_sum is None:
            return {}
        return {
            Scaffold.VARIATE + n: (g / max(steps, 1)).cpu().numpy().astype(np.float32)
            for n, g in self.grad_sum.items()
        }
