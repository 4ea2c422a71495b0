"""Run by tests/test_vllm_distributed.py under torchrun (not collected by pytest): every rank
starts its own VLLMEngine inside the job's process group, as `cir train` does, and checks that
the engines are independent and leave the job's group working. Writes its report as JSON to
`<argv[1]>.<rank>` (the ranks share stdout, where their lines could interleave)."""

import json
import sys

import torch

from cir.distributed import init_distributed
from cir.engines.base import SamplingParams
from cir.engines.vllm import VLLMEngine
from cir.tasks import demo


def all_reduce_sum(value: int, device: str) -> int:
    out = torch.tensor([value], device=device)
    torch.distributed.all_reduce(out)
    return int(out.item())


def main() -> None:
    ctx = init_distributed(timeout_s=120)
    torch.set_num_threads(1)
    tok = demo.demo_tokenizer()
    model = demo.demo_model(tok, hidden_size=64, num_layers=2, num_heads=2, seed=0)  # head size 32
    prompt = tok.encode("Q: 3+4=?\n", add_special_tokens=False)
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, seed=1234)
    report = {"rank": ctx.rank}

    engine = VLLMEngine.from_model(model, tok, max_batch_size=4)
    from vllm.distributed.parallel_state import get_tp_group, get_world_group

    report["backend"] = engine._llm.vllm_config.parallel_config.distributed_executor_backend
    report["vllm_world"] = get_world_group().world_size
    report["vllm_tp"] = get_tp_group().world_size
    (report["engine_device"],) = engine._llm.apply_model(lambda model: str(next(model.parameters()).device))
    report["sum_with_engine"] = all_reduce_sum(ctx.rank + 1, ctx.device)
    # Uneven work: rank r sends r + 1 requests. Engines that stepped together (a collective in
    # the forward pass) would wait for each other here until the timeout.
    completions = engine.generate_batch([prompt] * (ctx.rank + 1), seeded)
    report["tokens"] = [c.token_ids for c in completions]
    engine.close()
    report["sum_after_close"] = all_reduce_sum(ctx.rank + 1, ctx.device)
    with open(f"{sys.argv[1]}.{ctx.rank}", "w") as f:
        json.dump(report, f)
    # Both ranks leave the process group together before the interpreter exits: a rank that tears
    # it down while the other still uses it can abort ("terminate called without an active
    # exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
