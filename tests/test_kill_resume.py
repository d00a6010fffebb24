"""Killed fits resume to the same model: SIGKILL at each compression phase, resume from the last checkpoint.

The outcome of each phase is equal weights to an uninterrupted run with the same seed, or a clear refusal of
the resume; never a silent difference. The table (phase x outcome) is printed with ``-s``.
"""

from __future__ import annotations

import signal

import torch
from helpers import KILL_PHASES, pipeline_run, start_killed


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    plain = (torch.Tensor, torch.nn.Parameter)
    return {k: v if type(v) in plain else v.dequantize() for k, v in model.state_dict().items()}


def _differences(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    if set(state) != set(reference):
        return sorted(set(state) ^ set(reference))
    return [k for k in reference if state[k].shape != reference[k].shape or not torch.equal(state[k], reference[k])]


def test_sigkill_at_each_phase_resumes_to_the_uninterrupted_model_or_is_refused(tmp_path):
    killed = {phase: start_killed(tmp_path / phase, at) for phase, at in KILL_PHASES.items()}  # in parallel
    reference = _state(pipeline_run(tmp_path / "uninterrupted"))
    outcomes: dict[str, str] = {}
    for phase, process in killed.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == -signal.SIGKILL, f"{phase}: the run was not killed: {stderr.decode()[-2000:]}"
        folder = tmp_path / phase
        try:
            resumed = pipeline_run(folder, ckpt_path=folder / "last.ckpt")
        except ValueError as err:
            assert "ckpt_path=" in str(err) and str(folder / "last.ckpt") in str(err), err
            outcomes[phase] = f"refused: {str(err)[:90]}..."
            continue
        differences = _differences(_state(resumed), reference)
        outcomes[phase] = "equal" if not differences else f"DIFFERENT: {differences[:3]}"
    print("\n| killed in | outcome |\n|---|---|\n" + "\n".join(f"| {p} | {o} |" for p, o in outcomes.items()))
    assert not [p for p, o in outcomes.items() if o.startswith("DIFFERENT")], outcomes
    # mid-epoch kills resume from the last epoch's checkpoint and train on to the same model; after the last
    # epoch Lightning runs no train-end hook, so QuantizeOnFit refuses the resume rather than not quantizing
    assert outcomes == {**dict.fromkeys(("pruning", "nystrom", "qat"), "equal"), "quantize": outcomes["quantize"]}
    assert outcomes["quantize"].startswith("refused")


def test_ddp_sigkill_after_pruning_resumes_to_the_uninterrupted_model(tmp_path):
    """Both ranks killed mid-epoch after the pruning step; the DDP resume ends where an uninterrupted DDP run
    ends."""
    from helpers import ddp_pipeline

    assert ddp_pipeline(tmp_path / "uninterrupted") == 0
    killed = tmp_path / "killed"
    assert ddp_pipeline(killed, KILL_PHASES["pruning"]) == -signal.SIGKILL
    assert not (killed / "final.pt").exists()
    assert ddp_pipeline(killed, ckpt_path=killed / "last.ckpt") == 0
    reference = torch.load(tmp_path / "uninterrupted" / "final.pt", weights_only=True)
    assert _differences(torch.load(killed / "final.pt", weights_only=True), reference) == []
