"""Prompts as token ids and as embeddings — one function shared by rollout and learner.

vLLM on CPU cannot run multimodal towers, so the rollout feeds the engine
`prompt_embeds`; the learner must see byte-identical inputs, hence both call
`build_prompt_embeds` with the same projector weights.
"""
from __future__ import annotations

import torch

IMAGE_TOKEN = "<image>"
INSTRUCTION = (
    "{question} First think about it inside <think> </think>, "
    "then answer with {ref_token} for the object, or say there is no such object."
)


def chat_prompt_text(tokenizer, instruction: str) -> str:
    """One user turn of an image and an instruction, chat-formatted, generation prompt appended."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_TOKEN}\n{instruction}"}], add_generation_prompt=True, tokenize=False
    )


def prompt_text(tokenizer, question: str, ref_token: str = "<SEG>") -> str:
    """The chat-formatted prompt for one image and a segmentation question."""
    return chat_prompt_text(tokenizer, INSTRUCTION.format(question=question.strip(), ref_token=ref_token))


def chat_prompt_ids(tokenizer, instruction: str) -> list[int]:
    ids = tokenizer(chat_prompt_text(tokenizer, instruction), add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if ids.count(image_id) != 1:
        raise ValueError(f"prompt must hold exactly one {IMAGE_TOKEN} token, found {ids.count(image_id)}")
    return ids


def prompt_ids(tokenizer, question: str, ref_token: str = "<SEG>") -> list[int]:
    return chat_prompt_ids(tokenizer, INSTRUCTION.format(question=question.strip(), ref_token=ref_token))


def build_prompt_embeds(
    ids: list[int] | torch.Tensor,
    image_token_id: int,
    vision_features: torch.Tensor,
    projector: torch.nn.Module,
    embed_tokens: torch.nn.Module,
) -> torch.Tensor:
    """[T] ids with one image token + [N, Dv] cached features -> [T - 1 + N, H] embeddings.

    The image token is replaced in place by the N projected patch features
    (LLaVA's layout); gradients flow into the projector and the embeddings.
    """
    ids = torch.as_tensor(ids, dtype=torch.long, device=vision_features.device)
    where = (ids == image_token_id).nonzero().flatten()
    if where.numel() != 1:
        raise ValueError(f"expected exactly one image token (id {image_token_id}) in the prompt, found {where.numel()}")
    at = int(where[0])
    text = embed_tokens(ids)
    image = projector(vision_features.to(text.dtype))
    return torch.cat([text[:at], image, text[at + 1 :]], dim=0)
