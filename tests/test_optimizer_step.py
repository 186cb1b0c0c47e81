"""One gradient preparation and one grad-norm reduction per step: the trainer's step (prepare,
norm, non-finite check, clip by that norm, step with ready grads) updates the weights exactly
as Megatron's own ``optimizer.step()`` does, with clipping active."""

import torch

from tests.driver_utils import driver_cfg
from tests.helpers import free_port


def _trainer(cfg):
    import os

    from crnet_megatron.training.trainer import Trainer

    os.environ["MASTER_PORT"] = str(free_port())
    return Trainer(cfg)


def _counted(obj, name, counts):
    real = getattr(obj, name)

    def wrapped(*a, **k):
        counts[name] = counts.get(name, 0) + 1
        return real(*a, **k)
    setattr(obj, name, wrapped)


def test_trainer_step_prepares_once_and_matches_megatron_step(tiny_dataset, tmp_path):
    from crnet_megatron.parallel import compat
    from crnet_megatron.parallel.groups import destroy_distributed
    from crnet_megatron.parallel.schedule import run_schedule

    cfg = driver_cfg(tiny_dataset, tmp_path / "c", None, "optimizer.clip_grad=0.05")
    try:
        ours = _trainer(cfg)
        counts = {}
        for name in ("prepare_grads", "get_grad_norm", "step"):
            _counted(ours.optimizer, name, counts)
        data = ours._iterators(ours.train_ds, 0)
        norms = [ours.train_step(data)["grad_norm"] for _ in range(2)]
        assert counts == {"prepare_grads": 2, "get_grad_norm": 2}  # and never step()
        got = {n: p.detach().clone() for n, p in ours.model[0].named_parameters()}
    finally:
        destroy_distributed()
    try:
        ref = _trainer(cfg)
        data = ref._iterators(ref.train_ds, 0)
        s = cfg["schedule"]
        ref_norms = []
        for _ in range(2):
            ref.model[0].zero_grad_buffer()
            ref.optimizer.zero_grad()
            run_schedule(ref.model, data, ref.num_microbatches, cfg["model"]["seq_length"],
                         s["micro_batch_size"], False)
            with compat.cuda_device_rewrite():
                _, norm, _ = ref.optimizer.step()  # Megatron's own step
            ref.scheduler.step(increment=1)
            ref_norms.append(norm)
        assert norms == ref_norms and max(ref_norms) > 0.05  # clipping was active
        for n, p in ref.model[0].named_parameters():
            torch.testing.assert_close(got[n], p.detach(), rtol=0, atol=0)
    finally:
        destroy_distributed()
