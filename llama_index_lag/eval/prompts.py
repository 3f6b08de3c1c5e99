"""The prompts ``lag eval`` answers: exactly what the LlamaIndex pipeline sends (its synthesizers' templates,
formatted as ``LLM.predict`` does)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError


# ---- prompts (exactly what the pipeline sends) ---------------------------------------------------------
class ChatPrompt(str):
    """A rendered chat prompt that remembers its user-message texts (``focus``): LAGLLM.chat marks the same
    tokens as the request's content for sequence-level routing, so the harness does too."""

    focus: list[str] | None = None


def predict_prompt(llm: Any, template: Any, **kwargs: Any) -> str:
    """What ``llm.predict(template, **kwargs)`` hands to ``LAGLLM.complete`` (formatted=True)."""
    if llm.metadata.is_chat_model:
        messages = llm._get_messages(template, **kwargs)
        prompt = ChatPrompt(llm.chat_prompt(messages))
        prompt.focus = [m.content for m in messages if m.role.value == "user" and m.content]
        return prompt
    return llm._get_prompt(template, **kwargs)


def question_prompt(engine: Any, question: str) -> str:
    """The prompt of a question-only pipeline mode (the ``generation`` synthesizer)."""
    synth = engine._response_synthesizer
    template = synth.get_prompts().get("simple_template")
    if template is None:
        raise ConfigError(f"unexpected synthesizer {type(synth).__name__} for a question-only mode")
    return predict_prompt(synth._llm, template, query_str=question)


def rag_prompt(engine: Any, question: str, nodes: Sequence[Any]) -> str | None:
    """The prompt of a RAG pipeline mode (compact / refine synthesizer, text-QA template), or None when the
    pipeline would make more than one LLM call for it (context larger than one window, other modes)."""
    from llama_index.core.prompts.prompt_utils import get_biggest_prompt
    from llama_index.core.response_synthesizers import CompactAndRefine, Refine
    from llama_index.core.schema import MetadataMode

    synth = engine._response_synthesizer
    if not isinstance(synth, Refine) or getattr(synth, "_multimodal", False) or synth._output_cls is not None:
        return None
    texts = [n.node.get_content(metadata_mode=MetadataMode.LLM) for n in nodes]
    if not texts:
        return None
    if isinstance(synth, CompactAndRefine):
        texts = synth._make_compact_text_chunks(question, texts)
    max_prompt = get_biggest_prompt([synth._text_qa_template, synth._refine_template])
    chunks = [tc for chunk in texts for tc in synth._prompt_helper.repack(
        max_prompt, [chunk], llm=synth._llm, padding=synth._response_padding_size)]
    if len(chunks) != 1:
        return None
    template = synth._text_qa_template.partial_format(query_str=question)
    return predict_prompt(synth._llm, template, context_str=chunks[0])


def template_text(prompt: Any) -> Any:
    """A serialisable description of a (selector) prompt template, for the run fingerprint."""
    try:
        return prompt.get_template()
    except Exception:  # noqa: BLE001 - selector templates without an llm
        default = getattr(prompt, "default_template", None)
        conditionals = getattr(prompt, "conditionals", None) or []
        return {"default": template_text(default) if default is not None else repr(prompt),
                "conditionals": [template_text(t) for _, t in conditionals]}
