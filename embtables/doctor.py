"""`embtables doctor`: versions, device, and whether FBGEMM's operators load."""

from __future__ import annotations

import importlib
import platform
import sys

PINNED = {"torch": "2.13.0", "torchrec": "1.8.0", "fbgemm_gpu": "1.8.0"}


def diagnose() -> tuple[list[str], list[str]]:
    """(report lines, problems in plain sentences)."""
    lines = [f"python      {platform.python_version()} ({sys.executable})",
             f"platform    {platform.platform()}"]
    problems: list[str] = []
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return lines + [f"torch       NOT IMPORTABLE: {e}"], [
            "torch is not installed or does not load: run `make setup` (it installs torch 2.13.0)."
        ]
    lines.append(f"torch       {torch.__version__} (cuda build: {torch.version.cuda or 'no'})")
    cuda = torch.cuda.is_available()
    lines.append(f"device      {'cuda: ' + torch.cuda.get_device_name(0) if cuda else 'cpu'} "
                 f"({torch.get_num_threads()} threads)")
    if not torch.__version__.startswith(PINNED["torch"]):
        problems.append(f"torch is {torch.__version__}, but this release is tested with {PINNED['torch']}; "
                        "FBGEMM 1.8 may not load against it.")
    fbgemm_version = None
    try:
        fbgemm = importlib.import_module("fbgemm_gpu")
        fbgemm_version = getattr(fbgemm, "__version__", "unknown")
        variant = getattr(fbgemm, "__variant__", "")
        lines.append(f"fbgemm_gpu  {fbgemm_version} {variant}".rstrip())
    except Exception as e:  # noqa: BLE001 - the message is the diagnosis
        lines.append(f"fbgemm_gpu  FAILED TO LOAD: {str(e).splitlines()[0][:200]}")
        problems.append(
            "FBGEMM does not load. The classic cause is a torch/FBGEMM pair that does not match "
            f"(needs torch {PINNED['torch']} with fbgemm-gpu-cpu {PINNED['fbgemm_gpu']} on CPU or fbgemm-gpu "
            f"{PINNED['fbgemm_gpu']} on CUDA); reinstall with `make clean setup`."
        )
    if fbgemm_version is not None:
        try:
            x = torch.tensor([1, 2, 3])
            out = torch.ops.fbgemm.asynchronous_complete_cumsum(x)
            assert out.tolist() == [0, 1, 3, 6]
            lines.append("fbgemm ops  load and run (asynchronous_complete_cumsum ok)")
        except Exception as e:  # noqa: BLE001
            lines.append(f"fbgemm ops  FAILED: {str(e).splitlines()[0][:200]}")
            problems.append(
                "FBGEMM imports but its operators are missing: its build does not match this torch "
                f"({torch.__version__}); install fbgemm-gpu-cpu {PINNED['fbgemm_gpu']} "
                f"with torch {PINNED['torch']}."
            )
        if cuda and "cpu" in str(getattr(importlib.import_module("fbgemm_gpu"), "__variant__", "")).lower():
            problems.append("a GPU is present but the CPU build of FBGEMM is installed: "
                            "`make clean setup DEVICE=cuda`.")
    try:
        torchrec = importlib.import_module("torchrec")
        lines.append(f"torchrec    {torchrec.__version__}")
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=4,
                                                                feature_names=["f"])])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1]),
                                                  lengths=torch.tensor([1]))
        ebc(kjt)
        lines.append("torchrec    an EmbeddingBagCollection runs")
    except Exception as e:  # noqa: BLE001
        lines.append(f"torchrec    FAILED: {str(e).splitlines()[0][:200]}")
        problems.append("torchrec does not import or run: `make clean setup` reinstalls the pinned set.")
    import embtables

    lines.append(f"embtables   {embtables.__version__}")
    return lines, problems


def main() -> int:
    lines, problems = diagnose()
    print("\n".join(lines))
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nAll good.")
    return 0
