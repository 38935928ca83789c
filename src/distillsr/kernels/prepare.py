"""Inference preparation: the models' modules swapped for their fused forms, and back.

A model's classes compute what its paper describes, op by op, in training, inference
and export alike. :func:`prepare_for_inference` readies a model for fast inference:

* it puts the model in eval mode;
* every module that has a fused form (``distillsr.kernels.asid``: ``LM``, the SAM
  ``AttentionUnit``, ``CAM``, ``ESA``, ``IDB``, the NHWC convs) becomes that form, in
  place: the same object with the same parameters (``state_dict``, ``parameters()``,
  optimisers and hooks see no difference), whose ``forward`` runs the fused CPU kernels
  (``distillsr.kernels.ops``) and returns the same thing as the paper form;
* the algebraic merges are done once (e.g. an attention unit's value projection folded
  into its output projection, ``W_o W_v``) and kept with the form.

A prepared module still runs its paper form where the fused one cannot serve: with
autograd on, while tracing or compiling (``torch.onnx.export``, ``torch.compile``), on
tracer tensors. Otherwise it never computes from stale merges:

* ``model.train()`` restores the paper modules (training sees only those); ``eval()``
  afterwards does not prepare again: call ``prepare_for_inference`` again;
* when a weight a merge comes from changes in place (an optimiser step,
  ``load_state_dict``, ``torch.no_grad()`` edits) or is replaced (``.to()``, assignment),
  which PyTorch records in the tensor's version counter and data pointer, the merge is
  redone at the next call. Edits through ``.data`` bypass the version counter: after
  those, call ``prepare_for_inference`` again.

``distillsr.kernels.enabled = False`` (or ``DISTILLSR_KERNELS=0`` in the environment)
is the one switch for the fused CPU kernels: prepared modules then run the merged
computation op by op in PyTorch.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["FusedForm", "register_form", "prepare_for_inference", "restore_paper_modules",
           "is_prepared", "paper_modules"]

FORMS: Dict[type, type] = {}          # paper class -> fused form
_FORM_MODULES = ("distillsr.kernels.asid",)


class FusedForm:
    """Mixin of a fused inference form (first base; the paper class second).

    A form may cache tensors derived from its parameters (``_derive``, from the tensors
    ``_sources`` lists); ``cache()`` returns them, recomputed first if a source changed.
    """

    paper: type = nn.Module  # the paper class this form replaces (set by ``register_form``)

    def _sources(self) -> List[torch.Tensor]:
        return []

    def _derive(self) -> Dict[str, torch.Tensor]:
        return {}

    def cache(self) -> Dict[str, torch.Tensor]:
        stamp = _stamp(self._sources())
        cached = self.__dict__.get("_fused_cache")
        if cached is None or stamp is None or stamp != cached[0]:
            with torch.no_grad():
                cached = (stamp, self._derive())
            self.__dict__["_fused_cache"] = cached
        return cached[1]

    def train(self, mode: bool = True):
        if mode:
            _restore(self)
        return nn.Module.train(self, mode)


def _stamp(tensors: List[torch.Tensor]) -> Optional[Tuple]:
    """What identifies the values of ``tensors``: version counter, storage, dtype, device,
    shape. None for inference tensors (they keep no version counter): never cached."""
    try:
        return tuple((t._version, t.data_ptr(), t.dtype, t.device, t.shape) for t in tensors)
    except RuntimeError:
        return None


def _restore(module: nn.Module) -> None:
    module.__dict__.pop("_fused_cache", None)
    module.__dict__.pop("_workspace", None)
    module.__class__ = type(module).paper


def register_form(paper: type):
    """Class decorator: the decorated class is the fused form of ``paper``."""
    def deco(form: type) -> type:
        if not (issubclass(form, FusedForm) and issubclass(form, paper)):
            raise TypeError(f"{form.__name__} must derive from FusedForm and {paper.__name__}")
        form.paper = paper
        FORMS[paper] = form
        return form
    return deco


def _load_forms() -> None:
    for name in _FORM_MODULES:
        importlib.import_module(name)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Ready ``model`` for fast inference, in place, and return it (see the module doc):
    eval mode, fused forms, algebraic merges done. Any model is accepted; modules
    without a fused form (all of the CNNs) are left as they are. Preparing a prepared
    model again redoes the merges."""
    _load_forms()
    model.eval()
    for m in model.modules():
        form = FORMS.get(type(m))
        if form is not None:
            m.__class__ = form
        if isinstance(m, FusedForm):
            m.__dict__.pop("_fused_cache", None)
            m.__dict__.pop("_workspace", None)
            m.cache()
    return model


def restore_paper_modules(model: nn.Module) -> List[nn.Module]:
    """Turn every fused form in ``model`` back into its paper module (in place); returns
    the modules that were fused."""
    fused = [m for m in model.modules() if isinstance(m, FusedForm)]
    for m in fused:
        _restore(m)
    return fused


def is_prepared(model: nn.Module) -> bool:
    """Whether ``model`` holds fused forms (``prepare_for_inference`` was called and no
    ``train()`` since)."""
    return any(isinstance(m, FusedForm) for m in model.modules())


@contextlib.contextmanager
def paper_modules(model: nn.Module) -> Iterator[nn.Module]:
    """``with paper_modules(model):`` the model runs its paper modules (ONNX export);
    the modules that were fused are fused again afterwards."""
    fused = restore_paper_modules(model)
    try:
        yield model
    finally:
        _load_forms()
        for m in fused:
            m.__class__ = FORMS[type(m)]
