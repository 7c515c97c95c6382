"""A tiny random LLaVA-1.5 built from a config: the real LLaVA code path, offline, in 0.1 s.

``llava-hf/llava-1.5-7b-hf`` cannot be downloaded in CI, but everything esmc_lens does with
it goes through the same classes this builds: ``LlavaForConditionalGeneration`` (CLIP
vision tower, 2-layer GELU projector, Llama language model), a ``LlavaProcessor`` with a
CLIP image processor, the LLaVA-1.5 chat template and ``vision_feature_select_strategy
="default"`` (CLS dropped, hence ``num_additional_image_tokens=1``). Only the sizes and the
(random) weights differ. Its outputs mean nothing; use it to test code paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IMAGE_TOKEN = "<image>"
# The chat template that ships with llava-hf/llava-1.5-7b-hf's processor.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = """USER: ASSISTANT: The color of the flower is red. The color of the image is blue.
The species of the flower is rose daisy lily hyacinth. The shape of the object is a circle,
square, triangle or star. Colors: red green blue yellow white black pink purple brown orange
gray. The background is white. What are common colors of flowers? Answer with single words.
Describe the image. The cat sat on the mat. A photo of a dog, a car, a bird and a tree.
Identify the color of this vehicle. Provide the exact car color. Brand of the car: BMW Volvo.
"""


def build_tokenizer(vocab_size: int = 512, specials: Sequence[str] = (IMAGE_TOKEN,),
                    bos: str | None = "<s>", eos: str = "</s>", pad: str = "<pad>",
                    named: dict[str, str] | None = None):
    """A byte-level BPE tokenizer trained in memory, with ``specials`` as special tokens.

    ``<unk>``, ``bos``, ``eos`` and ``pad`` come first, then ``specials`` (a family's image,
    chat and marker tokens); ``named`` are the tokenizer's named extra special tokens
    (``tok.image_token`` ...), by default ``image_token="<image>"`` when ``<image>`` is one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if named is None:
        named = {"image_token": IMAGE_TOKEN} if IMAGE_TOKEN in specials else {}
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    first = [t for t in ("<unk>", bos, eos, pad) if t is not None]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(dict.fromkeys([*first, *specials])),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(_CORPUS.split("\n") * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token="<unk>",
        pad_token=pad, padding_side="left", extra_special_tokens=dict(named),
    )
    return tok


def build_tiny_llava(seed: int = 0, image_size: int = 30, patch_size: int = 6,
                     n_layers: int = 4, d_model: int = 64):
    """(model, processor): a random LLaVA-1.5-shaped model and its real processor classes."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size,
                              patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                       num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch_size) ** 2)
    config.architectures = ["LlavaForConditionalGeneration"]
    # Fork the RNG so building the tiny model never changes the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=LLAVA_15_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor
