"""Processors of every family, with or without torchvision.

transformers 5.23 has PIL image processors for every supported family, but two things still
need torchvision:

* a processor with a video sub-processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision,
  InternVL, SmolVLM) cannot be built at all: every video processor is torchvision-based, and
  ``ProcessorMixin`` type-checks each sub-processor against ``VideoProcessorMixin``, which is
  exported only with torchvision, so even ``video_processor=None`` fails.
  :func:`image_only_class` makes a subclass without that sub-processor: the real class's own
  ``__init__``, ``__call__`` and chat template, images only.
* ``PixtralProcessor`` (Pixtral, Mistral 3) imports torchvision when its module is imported.
  :class:`PixtralTextImageProcessor` lays the image tokens out as it does, over the real
  ``PixtralImageProcessorPil``.

Both save as the processor they stand for (``processor_class`` in ``processor_config.json``),
and :func:`load_processor` loads a checkpoint's processor either way.
"""

from __future__ import annotations

import functools

from transformers.processing_utils import ProcessorMixin


@functools.cache
def image_only_class(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``cls`` without its ``video_processor``: built, called and saved as ``cls`` is.

    Without torchvision the video sub-processor can neither be built nor type-checked; this
    subclass leaves it out of the processor's attributes (so ``__init__`` checks, and
    ``save_pretrained`` / ``from_pretrained`` handle, the image processor and tokenizer only)
    and passes ``video_processor=None`` to the real ``__init__``. Videos are not supported.
    """
    attrs = [a for a in cls.get_attributes() if a != "video_processor"]
    video_at = cls.get_attributes().index("video_processor")

    def to_dict(self) -> dict:
        out = cls.to_dict(self)
        out["processor_class"] = cls.__name__  # a checkpoint of the real processor
        return out

    def from_args_and_dict(sub, args, processor_dict, **kwargs):
        args = [*args[:video_at], None, *args[video_at:]]  # the real __init__'s positions
        return super(image_only, sub).from_args_and_dict(args, processor_dict, **kwargs)

    namespace = {
        "__module__": __name__, "__doc__": f"{cls.__name__} without a video processor.",
        "get_attributes": classmethod(lambda sub: list(attrs)), "to_dict": to_dict,
        "from_args_and_dict": classmethod(from_args_and_dict), "video_processor": None,
    }
    if "apply_chat_template" in cls.__dict__:
        # SmolVLM's override only reads the video processor's frame defaults
        namespace["apply_chat_template"] = ProcessorMixin.apply_chat_template
    image_only = type(f"{cls.__name__}ImageOnly", (cls,), namespace)
    return image_only


def build_image_only(cls: type[ProcessorMixin], **parts) -> ProcessorMixin:
    """An instance of ``cls`` (a processor class with a video sub-processor), images only."""
    return image_only_class(cls)(video_processor=None, **parts)


class PixtralTextImageProcessor(ProcessorMixin):
    """PixtralProcessor's token layout without torchvision (Pixtral, Mistral 3).

    Each image becomes rows of one ``[IMG]`` per (merged) patch ending in ``[IMG_BREAK]``,
    the last row ending in ``[IMG_END]``; pixels come from ``PixtralImageProcessorPil``, which
    resizes to a multiple of ``patch_size * spatial_merge_size``.
    """

    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16,
                 spatial_merge_size: int = 1, chat_template: str | None = None,
                 image_token: str = "[IMG]", image_break_token: str = "[IMG_BREAK]",
                 image_end_token: str = "[IMG_END]", **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def _process_images(self, images, **kwargs):
        kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        step = self.patch_size * self.spatial_merge_size
        height, width = (int(x) for x in image_inputs["image_sizes"][image_idx])
        row = self.image_token * (width // step) + self.image_break_token
        rows = row * (height // step)
        return rows[: -len(self.image_break_token)] + self.image_end_token

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["processor_class"] = "PixtralProcessor"
        return out


def load_processor(src: str, processor_class: str) -> ProcessorMixin:
    """The processor of checkpoint ``src`` (hub id or directory), whose family ships
    ``processor_class``: ``AutoProcessor``'s, or without torchvision the stand-ins above."""
    import transformers
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        if processor_class == "PixtralProcessor":  # its module imports torchvision
            return PixtralTextImageProcessor.from_pretrained(src)
        cls = getattr(transformers, processor_class)
        if "video_processor" in cls.get_attributes():
            return image_only_class(cls).from_pretrained(src)
    return transformers.AutoProcessor.from_pretrained(src)
