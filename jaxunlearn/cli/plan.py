"""``jaxunlearn plan``: compile the real unlearning step from shapes on N simulated devices and
print bytes and FLOPs per device, and whether it fits each named accelerator
(`jaxunlearn.plan`).

    jaxunlearn plan --model llama-3.1-8b --method npo --mesh fsdp=8 --batch 4 --seq 512 \\
        --precision bf16-params --remat matmuls
    jaxunlearn plan --model llama-3.2-1b --lora 16 --batch 8 --seq 512 --remat full  # LoRA
    jaxunlearn plan --model llama-3.1-8b --mesh fsdp=4,model=2 --batch 4 --seq 512  # + TP
"""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """Adds ``plan`` to the subcommands."""
    from jaxunlearn import plan

    p = subparsers.add_parser(
        "plan",
        help="compile the unlearning step from shapes: bytes and FLOPs per device",
        description=plan.__doc__.split("\n\n")[0],
    )
    plan.add_arguments(p)
    p.set_defaults(run=plan.run)
