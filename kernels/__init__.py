"""Triton kernels and their host launchers. Installed as ``prefixattn.kernels``.

This folder sits at the repository root (the project's layout), so Python started there (pytest,
``python -m bench``, a user's script) finds it as a top-level package named ``kernels`` before Hugging
Face's ``kernels``, which transformers >= 5.25 imports. Imported under that top-level name, it hands the
name over to the installed package instead of shadowing it; as ``prefixattn.kernels`` it is the kernels.
"""

if __name__ == "kernels":
    from ._top_level_name import hand_over_to_installed_kernels

    hand_over_to_installed_kernels()
else:
    from .backward import attention_backward
    from .forward import attention_forward

    __all__ = ["attention_forward", "attention_backward"]
