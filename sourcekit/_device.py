"""``device="auto"``, and devices this build of torch cannot use.

Every attributor, the trainer and the replay take a ``device`` parameter: ``"auto"``
(CUDA when present, else the CPU), a device string or a ``torch.device``.
:func:`resolve_device` turns it into a ``torch.device`` and refuses, with the standard
wording of a bad parameter, a name torch does not know or a CUDA device this build or
machine does not have (torch itself would fail later, deep inside a pass, with an
assertion about how it was compiled).
"""

from __future__ import annotations

from typing import Any

import torch

from ._validation import bad_value

__all__ = ["resolve_device"]


def resolve_device(device: Any) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; other values as ``torch.device``.

    Raises
    ------
    ValueError
        If ``device`` names no device torch knows, or a CUDA device that is not available.

    Examples
    --------
    >>> from sourcekit._device import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> try:
    ...     resolve_device("gpu")
    ... except ValueError as err:
    ...     print(err)
    The 'device' parameter must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device; got 'gpu'. Use device='auto', 'cpu' or 'cuda'.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(
            bad_value(
                "device",
                device,
                "'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device",
                "Use device='auto', 'cpu' or 'cuda'.",
            )
        ) from err
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            have = "no CUDA device" if count == 0 else f"{count} CUDA device(s)"
            raise ValueError(
                bad_value(
                    "device",
                    str(device),
                    "a device that this torch build can use",
                    f"This torch build sees {have}. Use device='auto' (CUDA when present, "
                    "else the CPU) or device='cpu'.",
                )
            )
    return resolved
