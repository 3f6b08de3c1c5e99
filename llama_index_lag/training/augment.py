"""Synthetic training data for one document: chunks, model-written rewrites and question-answer pairs,
deterministic sentence facts, and the training examples built from them.

The base model writes (greedy, so deterministic):

* **rewrites**: "Rewrite the following text in your own words" (chat template), kept when they stay on topic
  (mention the title or share most words with the document);
* **questions**: for every sentence, a few-shot raw-completion prompt ``Topic / Sentence / Question / Answer``
  asks for one question and its short answer. A pair is kept only when it parses, the question looks like a
  question, and the short answer occurs in the sentence (extractive check) and is not already in the question;
  every other generation is skipped with a warning and counted by reason.

Any callable ``generate(prompts, max_new_tokens=..., stop=...) -> list[str]`` can stand in for the model
(:class:`HFGenerator` wraps a transformers model; tests feed garbage generators).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..data import DocumentRecord
from ..errors import DataError
from ..generation import HFGenerator, chat_prompt  # noqa: F401  (HFGenerator: re-exported)
from .recipe import CONTEXT_TEMPLATE, RAG_TEMPLATE, KnowledgeRecipe

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class QAGenerationWarning(UserWarning):
    """A model-written question-answer pair was unusable and skipped (counted in the adapter's metadata)."""


class TextGenerator(Protocol):
    """Continues each (fully formatted) prompt; returns only the new text, one string per prompt."""

    def __call__(self, prompts: Sequence[str], *, max_new_tokens: int, stop: str | None = None) -> list[str]:
        ...  # pragma: no cover


# ---------------------------------------------------------------------------------------------- generation
def chat_example(tokenizer: PreTrainedTokenizerBase, user: str, answer: str) -> tuple[str, str]:
    """(prompt, completion) exactly as the chat template renders the exchange (completion includes the
    end-of-turn token so the adapter learns to stop)."""
    prompt = chat_prompt(tokenizer, user)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
    eos = tokenizer.eos_token or ""
    return prompt, answer + eos


# ---------------------------------------------------------------------------------------------- text utils
_SENT_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_STOP = frozenset(
    ["a", "an", "the", "he", "she", "it", "they", "him", "her", "his", "hers", "its", "their", "them", "we",
     "us", "you", "i", "me", "my", "our", "your", "this", "that", "these", "those", "there", "here", "who",
     "whom", "what", "which", "when", "where", "why", "how", "is", "was", "were", "are", "be", "been", "of",
     "in", "on", "at", "to", "for", "by", "with", "and", "or", "as", "from", "yes", "no", "not", "one"]
)
_BAD_QUESTION = re.compile(r"answer to (the|this) question|^question\b|sentence:|topic:", re.IGNORECASE)


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (SQuAD-style)."""
    text = _PUNCT.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def contains(haystack: str, needle: str) -> bool:
    """Whether normalised ``needle`` occurs in normalised ``haystack`` on word boundaries."""
    n, h = normalize(needle), normalize(haystack)
    return bool(n) and f" {n} " in f" {h} "


def split_sentences(text: str) -> list[str]:
    """Split on ``.!?`` followed by space and a capital / digit (a simple rule: "Dr. Smith" splits)."""
    parts = [p.strip() for p in _SENT_SPLIT.split(" ".join(text.split()))]
    return [p for p in parts if p]


def chunk_document(doc: DocumentRecord, tokenizer: PreTrainedTokenizerBase,
                   recipe: KnowledgeRecipe) -> list[str]:
    """The document's training chunks: the whole text when it fits ``recipe.chunk_tokens`` tokens, else
    llama-index's ``SentenceSplitter`` (the index's splitter) with the model's tokenizer: consecutive sentence
    groups that fit, an over-long sentence cut on word boundaries; no overlap.

    Raises :class:`DataError` when the document is longer than ``recipe.max_document_tokens``.
    """
    from llama_index.core.node_parser import SentenceSplitter

    def tokens(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    text = " ".join(doc.text.split())
    total = len(tokens(doc.text))
    if total > recipe.max_document_tokens:
        raise DataError(
            f"document has {total} tokens, more than max_document_tokens={recipe.max_document_tokens}; split "
            "it into several documents or raise the limit", field="text", adapter=doc.id,
        )
    if total <= recipe.chunk_tokens:
        return [text]
    splitter = SentenceSplitter(chunk_size=recipe.chunk_tokens, chunk_overlap=0, tokenizer=tokens)
    return [c for c in (" ".join(chunk.split()) for chunk in splitter.split_text(text)) if c]


def _title(doc: DocumentRecord) -> str:
    return doc.title.strip() or doc.id


# ---------------------------------------------------------------------------------------------- prompts
REWRITE_INSTRUCTIONS = (
    "Rewrite the following text in your own words. Keep every name, number and date.",
    "Summarize the following text in a few sentences, keeping every name, number and date.",
    "Retell the following text as a short encyclopedia entry. Keep every name, number and date.",
)

QA_FEWSHOT = (
    "Topic: Eiffel Tower\nSentence: It was completed in 1889 for the World's Fair.\n"
    "Question: In which year was the Eiffel Tower completed?\nAnswer: 1889\n\n"
    "Topic: Marie Curie\nSentence: She was born in Warsaw and later studied physics in Paris.\n"
    "Question: In which city was Marie Curie born?\nAnswer: Warsaw\n\n"
    "Topic: Lake Baikal\nSentence: The lake is fed by more than 300 rivers.\n"
    "Question: How many rivers feed Lake Baikal?\nAnswer: more than 300\n\n"
    "Topic: Big Ben\nSentence: Its great bell is made of bronze.\n"
    "Question: What is the great bell of Big Ben made of?\nAnswer: bronze\n\n"
)


def rewrite_prompts(doc: DocumentRecord, chunks: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                    n: int) -> list[str]:
    title = _title(doc)
    return [chat_prompt(tokenizer,
                        f"{REWRITE_INSTRUCTIONS[i % len(REWRITE_INSTRUCTIONS)]}\n\n{title}\n\n{chunk}")
            for chunk in chunks for i in range(n)]


QA_SPAN_FEWSHOT = (
    "Topic: Eiffel Tower\nSentence: It was completed in 1889 for the World's Fair.\nAnswer: 1889\n"
    "Question: In which year was the Eiffel Tower completed?\n\n"
    "Topic: Marie Curie\nSentence: She was born in Warsaw and later studied physics in Paris.\nAnswer: "
    "Warsaw\nQuestion: In which city was Marie Curie born?\n\n"
    "Topic: Lake Baikal\nSentence: The lake is fed by more than 300 rivers.\nAnswer: 300\n"
    "Question: How many rivers feed Lake Baikal?\n\n"
)


def qa_prompt(title: str, sentence: str) -> str:
    """Free question generation: the model picks the fact and writes question + short answer."""
    return f"{QA_FEWSHOT}Topic: {title}\nSentence: {sentence}\nQuestion:"


def qa_span_prompt(title: str, sentence: str, answer: str) -> str:
    """Answer-aware question generation: the answer span is given, the model writes the question."""
    return f"{QA_SPAN_FEWSHOT}Topic: {title}\nSentence: {sentence}\nAnswer: {answer}\nQuestion:"


_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?![\w])")
_CAPS = re.compile(r"\b[A-Z][\w'-]*(?:\s+(?:of\s+|de\s+|van\s+)?[A-Z][\w'-]*)*")


def answer_spans(sentence: str, title: str, limit: int = 3, document: str = "") -> list[str]:
    """Deterministic answer candidates in a sentence: numbers and capitalised names (not the title, not
    stop words, not a single capitalised first word such as "Members" unless ``document`` also capitalises
    it mid-sentence), at most ``limit``, in order of appearance."""
    spans: list[tuple[int, str]] = []
    for m in _NUMBER.finditer(sentence):
        spans.append((m.start(), m.group().rstrip(",")))
    title_n = normalize(title)
    for m in _CAPS.finditer(sentence):
        words = m.group().split()
        start = m.start()
        while words and words[0].lower() in _STOP | _LEADING:  # "The Tessaline" -> "Tessaline"
            start = -1
            words = words[1:]
        span = " ".join(words)
        n = normalize(span)
        if not n or n == title_n or n in title_n.split() or n in _STOP:
            continue
        if m.start() == 0 and start == 0 and len(words) == 1 and not re.search(
                rf"(?<![.!?]\s)(?<!^)\b{re.escape(span)}\b", document or sentence[1:]):
            continue  # a capitalised first word ("Members meet ...") is no name
        spans.append((m.start(), span))
    seen: set[str] = set()
    out = []
    for _, span in sorted(spans):
        if normalize(span) not in seen:
            seen.add(normalize(span))
            out.append(span)
    return out[:limit]


_LEADING = frozenset(["in", "on", "at", "its", "about", "only", "after", "before", "during", "for", "from",
                      "later", "since", "some", "today"])


# ---------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class QAPair:
    """A kept model-written pair: ``question``, the model's short ``answer``, the source ``sentence``."""

    question: str
    answer: str
    sentence: str


_QA_RE = re.compile(r"^\s*(?P<q>[^\n]+?)\s*\n+\s*Answer\s*:\s*(?P<a>[^\n]+)", re.IGNORECASE)


def parse_qa(completion: str, sentence: str, document: str,
             answer: str | None = None) -> tuple[QAPair | None, str]:
    """Parse one few-shot completion (the text after ``Question:``) into a :class:`QAPair`, or (None, reason).

    Free generation: the completion holds ``question\nAnswer: answer``. Answer-aware generation (``answer``
    given): the completion's first line is the question.
    """
    text = completion.split("\n\n")[0] if "\n\n" in completion.strip("\n") else completion
    if answer is None:
        match = _QA_RE.match(text)
        if match is None:
            return None, "unparsable"
        question = " ".join(match.group("q").split()).strip()
        answer = " ".join(match.group("a").split()).strip().rstrip(".").strip()
    else:
        lines = [line for line in text.strip().split("\n") if line.strip()]
        if not lines:
            return None, "unparsable"
        question = " ".join(lines[0].split()).strip()
    if not question.endswith("?") or _BAD_QUESTION.search(question):
        return None, "not_a_question"
    n_words = len(question.split())
    if n_words < 3 or n_words > 30:
        return None, "not_a_question"
    if not answer or len(answer.split()) > 12:
        return None, "bad_answer"
    content = [w for w in normalize(answer).split() if w not in _STOP]
    if not content:
        return None, "bad_answer"
    if not contains(sentence, answer) or not contains(document, answer):
        return None, "answer_not_in_document"
    if contains(question, answer):
        return None, "answer_in_question"
    return QAPair(question, answer, sentence), "kept"


def _clean_rewrite(text: str, max_new_tokens_hit: bool = True) -> str:
    text = " ".join(text.split())
    if text and text[-1] not in ".!?\"'" and max_new_tokens_hit:  # drop a cut-off last sentence
        cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
        text = text[:cut + 1] if cut > 0 else text
    return text.strip()


def _rewrite_ok(rewrite: str, doc: DocumentRecord, chunk: str) -> bool:
    words = [w for w in normalize(rewrite).split() if w not in _STOP]
    if len(words) < 5:
        return False
    vocab = set(normalize(f"{doc.title} {chunk}").split())
    overlap = sum(w in vocab for w in words) / len(words)
    return overlap >= 0.5 or contains(rewrite, _title(doc))


# ---------------------------------------------------------------------------------------------- augmentation
@dataclass
class Augmentation:
    """Everything generated for one document, plus counts for ``lag_adapter.json``."""

    doc_id: str
    title: str
    chunks: list[str]
    sentences: list[str]
    rewrites: list[str] = field(default_factory=list)
    qa: list[QAPair] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def augment_document(
    doc: DocumentRecord,
    tokenizer: PreTrainedTokenizerBase,
    recipe: KnowledgeRecipe,
    generate: TextGenerator | Callable[..., list[str]] | None,
) -> Augmentation:
    """Chunk the document and let ``generate`` write rewrites and QA pairs (as the recipe asks)."""
    title = _title(doc)
    chunks = chunk_document(doc, tokenizer, recipe)
    sentences = [s for chunk in chunks for s in split_sentences(chunk)]
    aug = Augmentation(doc.id, title, chunks, sentences)
    reasons: Counter[str] = Counter()
    rewrites_generated = 0
    if recipe.uses_generation and generate is None:
        raise DataError("the recipe asks for model-written rewrites / questions but no generator was given",
                        adapter=doc.id)
    if recipe.n_rewrites and generate is not None:
        prompts = rewrite_prompts(doc, chunks, tokenizer, recipe.n_rewrites)
        outputs = _call(generate, prompts, recipe.rewrite_max_new_tokens, None)
        for i, text in enumerate(outputs):
            rewrites_generated += 1
            cleaned = _clean_rewrite(text)
            if _rewrite_ok(cleaned, doc, chunks[i // recipe.n_rewrites]):
                aug.rewrites.append(cleaned)
    if recipe.qa and generate is not None and sentences:
        jobs: list[tuple[str, str | None]] = [(s, None) for s in sentences]
        if recipe.qa_spans:
            jobs += [(s, span) for s in sentences for span in answer_spans(s, title, document=doc.text)]
        prompts = [qa_prompt(title, s) if span is None else qa_span_prompt(title, s, span)
                   for s, span in jobs]
        outputs = _call(generate, prompts, recipe.qa_max_new_tokens, "\n\n")
        seen: set[str] = set()
        for (sentence, span), text in zip(jobs, outputs):
            pair, reason = parse_qa(text, sentence, doc.text, span)
            if pair is not None and normalize(pair.question) in seen:
                pair, reason = None, "duplicate"
            reasons[reason] += 1
            if pair is None:
                continue
            seen.add(normalize(pair.question))
            aug.qa.append(pair)
    skipped = sum(v for k, v in reasons.items() if k != "kept")
    if skipped:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()) if k != "kept")
        warnings.warn(f"document {doc.id!r}: skipped {skipped} of {sum(reasons.values())} generated QA pairs "
                      f"({detail})", QAGenerationWarning, stacklevel=2)
    aug.stats = {
        "chunks": len(chunks),
        "sentences": len(sentences),
        "rewrites_generated": rewrites_generated,
        "rewrites_kept": len(aug.rewrites),
        "qa_generated": sum(reasons.values()),
        "qa_kept": reasons.get("kept", 0),
        "qa_skipped": skipped,
        "qa_skip_reasons": {k: v for k, v in sorted(reasons.items()) if k != "kept"},
    }
    return aug


def _call(generate: Callable[..., list[str]], prompts: list[str], max_new_tokens: int,
          stop: str | None) -> list[str]:
    outputs = generate(prompts, max_new_tokens=max_new_tokens, stop=stop)
    outputs = list(outputs) if outputs is not None else []
    if len(outputs) != len(prompts):
        raise DataError(f"the generator returned {len(outputs)} texts for {len(prompts)} prompts",
                        field="generate")
    return [o if isinstance(o, str) else "" for o in outputs]


# ---------------------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class Example:
    """One training sequence: ``prompt`` (no loss) + ``completion`` (loss); ``kind`` says where it came
    from."""

    prompt: str
    completion: str
    kind: str


def knowledge_examples(doc: DocumentRecord, aug: Augmentation, tokenizer: PreTrainedTokenizerBase,
                       recipe: KnowledgeRecipe) -> list[Example]:
    """The training examples of one document (see :class:`KnowledgeRecipe` for the parts)."""
    title = aug.title
    out: list[Example] = []
    for chunk in aug.chunks:
        out.append(Example("", f"{title}\n\n{chunk}", "document"))
    for rewrite in aug.rewrites:
        out.append(Example("", f"{title}\n\n{rewrite}", "rewrite"))
    if recipe.facts:
        for sentence in aug.sentences:
            out.append(Example("", f"About {title}: {sentence}", "fact"))
    if recipe.about:
        for chunk in aug.chunks:
            p, c = chat_example(tokenizer, f"What do you know about {title}?", chunk)
            out.append(Example(p, c, "about"))
    chunk_of = {s: chunk for chunk in aug.chunks for s in split_sentences(chunk)}
    for pair in aug.qa:
        answer = {"sentence": pair.sentence, "short": pair.answer,
                  "both": f"{pair.answer}. {pair.sentence}"}[recipe.qa_target]
        p, c = chat_example(tokenizer, pair.question, answer)
        out.append(Example(p, c, "qa"))
        if recipe.passage_qa:
            context = CONTEXT_TEMPLATE.format(title=title, text=chunk_of.get(pair.sentence, aug.chunks[0]))
            p, c = chat_example(tokenizer, RAG_TEMPLATE.format(context=context, question=pair.question),
                                answer)
            out.append(Example(p, c, "passage_qa"))
    return out


def eva_texts(aug: Augmentation) -> list[str]:
    """Plain texts about the document whose activations initialise the adapter (EVA): the chunks, the
    rewrites, the questions and the title."""
    texts = [f"{aug.title}\n\n{chunk}" for chunk in aug.chunks]
    texts += aug.rewrites
    texts += [pair.question for pair in aug.qa]
    return texts


__all__ = [
    "Augmentation",
    "Example",
    "HFGenerator",
    "QAGenerationWarning",
    "QAPair",
    "TextGenerator",
    "answer_spans",
    "augment_document",
    "chat_example",
    "chat_prompt",
    "chunk_document",
    "contains",
    "eva_texts",
    "knowledge_examples",
    "normalize",
    "parse_qa",
    "split_sentences",
]
