"""Template: a trajectory ``{messages, tools?}`` -> ``InputFeature {input_ids, labels, ...}``.

The generic Template lets the tokenizer's own ``chat_template`` decide the text, so any chat model
works without a dedicated class. What the chat template cannot say is which characters the assistant
wrote; they are found by rendering the conversation prefix by prefix (a template that is
prefix-stable puts each assistant turn exactly between ``render(messages[:i], add_generation_prompt)``
and ``render(messages[:i + 1])``), and by locating the assistant text in the full rendering where a
template rewrites earlier turns. The whole text is then tokenized once, so the ids are exactly those
of ``tokenizer.apply_chat_template``, and a token carries a label when it starts inside an assistant
span.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

from twinkle.registry import register
from twinkle.types import IGNORE_INDEX, InputFeature

from .validate import validate_tools, validate_trajectory, where, with_default_system

TruncationStrategy = Literal['raise', 'left', 'right', 'delete', 'split']
LossOn = Literal['all_turns', 'last_turn']
Span = Tuple[int, int]
_TRUNCATION = ('raise', 'left', 'right', 'delete', 'split')
Encoded = Union[InputFeature, List[InputFeature], None]
# With return_numpy the features hold the same keys as int64 arrays.
EncodeResult = Union[Encoded, Dict[str, Any], List[Dict[str, Any]]]
_LOSS_ON = ('all_turns', 'last_turn')


def load_tokenizer(model_id: str) -> Any:
    """Resolve a model id through the hub and load its tokenizer (the model weights are not read)."""
    from transformers import AutoTokenizer

    from twinkle import hub
    return AutoTokenizer.from_pretrained(hub.resolve(model_id))


@register('template')
class Template:
    """Encode trajectories with the tokenizer's chat template; labels only on assistant tokens.

    Args:
        model_id: a hub id or local folder whose tokenizer is loaded (``'builtin://tiny-qwen3'``,
            ``'hf://Qwen/Qwen3-0.6B'``, ``'ms://...'``, a path); or pass ``tokenizer``.
        tokenizer: an already loaded Hugging Face tokenizer (takes precedence over ``model_id``).
        max_length: the longest encoded sample; longer ones follow ``truncation_strategy``.
        truncation_strategy: ``'raise'`` (ValueError), ``'left'`` (keep the end), ``'right'`` (keep the
            start), ``'delete'`` (``encode`` returns None and the dataset counts the drop) or ``'split'``
            (``encode`` returns a list of consecutive pieces of at most ``max_length`` tokens, each its
            own sample; ``Dataset.encode`` stores them as separate rows). A sample
            that truncation leaves without a single label token is dropped by ``Dataset.encode`` and
            counted in ``stats['no_labels']`` with a warning, as it could only give a NaN loss.
        default_system: a system message inserted when a trajectory has none.
        loss_on: ``'all_turns'`` trains on every assistant turn, ``'last_turn'`` on the last only.
        chat_template_kwargs: extra variables for the chat template (e.g. ``enable_thinking``).
        return_numpy: ``encode`` returns ``input_ids``, ``labels``, ``attention_mask`` and
            ``position_ids`` as numpy int64 arrays (and ``position_ids`` always) instead of lists.
    """

    def __init__(self,
                 model_id: Optional[str] = None,
                 *,
                 tokenizer: Any = None,
                 max_length: Optional[int] = None,
                 truncation_strategy: TruncationStrategy = 'raise',
                 default_system: Optional[str] = None,
                 loss_on: LossOn = 'all_turns',
                 chat_template_kwargs: Optional[Dict[str, Any]] = None,
                 return_numpy: bool = False) -> None:
        if truncation_strategy not in _TRUNCATION:
            raise ValueError(f'truncation_strategy={truncation_strategy!r}; use one of {", ".join(_TRUNCATION)}')
        if loss_on not in _LOSS_ON:
            raise ValueError(f'loss_on={loss_on!r}; use one of {", ".join(_LOSS_ON)}')
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f'max_length must be a positive int or None, got {max_length!r}')
        if tokenizer is None:
            if model_id is None:
                raise ValueError(f'{type(self).__name__} needs model_id (e.g. "builtin://tiny-qwen3") or tokenizer=')
            tokenizer = load_tokenizer(model_id)
        self.model_id = model_id
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.default_system = default_system
        self.loss_on = loss_on
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.return_numpy = return_numpy
        self._check_tokenizer()

    # -- tokenizer facts ---------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> Optional[int]:
        pad = self._tokenizer.pad_token_id
        return self.eos_token_id if pad is None else pad

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _check_tokenizer(self) -> None:
        if not getattr(self._tokenizer, 'chat_template', None):
            name = getattr(self._tokenizer, 'name_or_path', '') or self.model_id or 'the tokenizer'
            raise ValueError(f'{name} has no chat_template, so the generic Template cannot render messages. '
                             f'Use a tokenizer that ships one, set tokenizer.chat_template, or a dedicated '
                             f"template such as 'Qwen3Template'.")

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, trajectory: Mapping[str, Any], add_generation_prompt: bool = False) -> EncodeResult:
        """Encode one trajectory; None when ``truncation_strategy='delete'`` drops it, a list of pieces
        when ``truncation_strategy='split'`` cuts it."""
        messages = with_default_system(validate_trajectory(trajectory), self.default_system)
        tools = validate_tools(trajectory)
        if not add_generation_prompt and not any(m['role'] == 'assistant' for m in messages):
            raise ValueError(f'{where(trajectory)}no assistant message to train on; add one, or pass '
                             f'add_generation_prompt=True to encode a prompt for generation')
        text, spans = self.render(messages, tools, add_generation_prompt)
        if add_generation_prompt:
            spans = []
        elif self.loss_on == 'last_turn':
            spans = spans[-1:]
        input_ids, labels = self.tokenize(text, spans)
        result = self._truncate(trajectory, input_ids, labels)
        if not self.return_numpy or result is None:
            return result
        return [_as_numpy(r) for r in result] if isinstance(result, list) else _as_numpy(result)

    def batch_encode(self, trajectories: Sequence[Mapping[str, Any]],
                     add_generation_prompt: bool = False) -> List[EncodeResult]:
        return [self.encode(t, add_generation_prompt=add_generation_prompt) for t in trajectories]

    def __call__(self, trajectory: Mapping[str, Any], add_generation_prompt: bool = False) -> EncodeResult:
        return self.encode(trajectory, add_generation_prompt=add_generation_prompt)

    # -- rendering (subclasses override `render`) -----------------------------------------------
    def apply_chat_template(self, messages: List[Dict[str, Any]], tools: Optional[list],
                            add_generation_prompt: bool) -> str:
        return self._tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt,
                                                   **self.chat_template_kwargs)

    def render(self, messages: List[Dict[str, Any]], tools: Optional[list],
               add_generation_prompt: bool) -> Tuple[str, List[Span]]:
        """The full text and, in order, the character span of each assistant turn (end-of-turn included)."""
        full = self.apply_chat_template(messages, tools, add_generation_prompt)
        if add_generation_prompt:
            return full, []
        spans: List[Span] = []
        cursor = 0
        for i, msg in enumerate(messages):
            if msg['role'] != 'assistant':
                continue
            span = self._assistant_span(full, messages, tools, i, cursor)
            spans.append(span)
            cursor = span[1]
        return full, spans

    def _assistant_span(self, full: str, messages: List[Dict[str, Any]], tools: Optional[list], i: int,
                        cursor: int) -> Span:
        try:
            head = self.apply_chat_template(messages[:i], tools, True) if i else None
        except Exception:  # some templates index messages[0] and fail on a short prefix
            head = None
        through = self.apply_chat_template(messages[:i + 1], tools, False)
        if head is not None and len(head) >= cursor and full.startswith(head) and through.startswith(head):
            turn = through[len(head):].rstrip()
            if full.startswith(turn, len(head)):
                start, end = len(head), len(head) + len(turn)
                # whitespace a template puts between its header and the text is not the assistant's
                if not messages[i]['content'][:1].isspace():
                    while start < end and full[start].isspace():
                        start += 1
                return start, end
        # The template renders this turn differently once later turns exist (e.g. reasoning dropped
        # from history): find the assistant's own text, then the end-of-turn marker after it.
        content, start = _locate_answer(full, messages[i]['content'], cursor)
        if start < 0:
            raise ValueError(
                f'cannot locate assistant message {i} in the text rendered by the chat template of '
                f'{self.model_id or "the tokenizer"}; use a template class written for this model '
                f"(e.g. 'Qwen3Template') or a prefix-stable chat template")
        end = start + len(content)
        marker = self._end_of_turn_marker(head, through, content)
        if marker and full.startswith(marker, end):
            end += len(marker)
        return start, end

    def _end_of_turn_marker(self, head: Optional[str], through: str, content: str) -> str:
        turn = through[len(head):] if head is not None and through.startswith(head) else through
        turn = turn.rstrip()
        at = turn.rfind(content)
        if at >= 0:
            return turn[at + len(content):]
        eos = getattr(self._tokenizer, 'eos_token', None)
        return eos if eos and turn.endswith(eos) else ''

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str, spans: Sequence[Span]) -> Tuple[List[int], List[int]]:
        """Token ids of the whole text and labels: the id where a token starts inside a span, else -100."""
        tok = self._tokenizer
        if getattr(tok, 'is_fast', False):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc['input_ids'])
            starts = [s for s, _ in enc['offset_mapping']]
        else:
            ids, starts = self._tokenize_slow(text, spans)
        labels = [IGNORE_INDEX] * len(ids)
        j = 0
        for k, s in enumerate(starts):
            while j < len(spans) and spans[j][1] <= s:
                j += 1
            if j == len(spans):
                break
            if spans[j][0] <= s:
                labels[k] = ids[k]
        return ids, labels

    def _tokenize_slow(self, text: str, spans: Sequence[Span]) -> Tuple[List[int], List[int]]:
        # Slow tokenizers give no character offsets: cut the text at span boundaries and tokenize each
        # piece. Boundaries sit next to special tokens in chat templates, where this changes nothing.
        cuts = sorted({0, len(text), *(p for span in spans for p in span)})
        ids: List[int] = []
        starts: List[int] = []
        for a, b in zip(cuts, cuts[1:]):
            piece = self._tokenizer.encode(text[a:b], add_special_tokens=False)
            ids.extend(piece)
            starts.extend([a] * len(piece))
        return ids, starts

    def _truncate(self, trajectory: Mapping[str, Any], input_ids: List[int], labels: List[int]) -> Encoded:
        n = len(input_ids)
        limit = self.max_length
        if limit is not None and n > limit:
            strategy = self.truncation_strategy
            if strategy == 'raise':
                raise ValueError(f'{where(trajectory)}encoded length {n} exceeds max_length={limit}. Raise '
                                 f"max_length, or set truncation_strategy='left', 'right' or 'delete' "
                                 f'(delete drops the sample and counts it)')
            if strategy == 'delete':
                return None
            if strategy == 'split':
                return [_feature(input_ids[i:i + limit], labels[i:i + limit]) for i in range(0, n, limit)]
            if strategy == 'left':
                input_ids, labels = input_ids[-limit:], labels[-limit:]
            else:
                input_ids, labels = input_ids[:limit], labels[:limit]
        return _feature(input_ids, labels)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(model_id={self.model_id!r}, max_length={self.max_length}, '
                f'truncation_strategy={self.truncation_strategy!r}, loss_on={self.loss_on!r})')


def _locate_answer(full: str, content: str, cursor: int) -> Tuple[str, int]:
    """The assistant text as rendered in ``full`` from ``cursor`` on, and where it starts (-1: not found).

    History turns may be rendered without their reasoning: a content holding a think block is then
    found by what follows its first or its last ``</think>`` (templates parse it either way).
    """
    candidates = [content.strip()]
    if '</think>' in content:
        candidates += [content.split('</think>', 1)[1].strip(), content.split('</think>')[-1].strip()]
    for text in candidates:
        start = full.find(text, cursor) if text else -1
        if start >= 0:
            return text, start
    return candidates[0], -1


def _feature(input_ids: List[int], labels: List[int]) -> InputFeature:
    return InputFeature(input_ids=input_ids, labels=labels, attention_mask=[1] * len(input_ids),
                        length=len(input_ids))


def _as_numpy(feature: InputFeature) -> Dict[str, Any]:
    import numpy as np
    out: Dict[str, Any] = {k: np.asarray(v, dtype=np.int64) if isinstance(v, list) else v
                           for k, v in feature.items()}
    out.setdefault('position_ids', np.arange(len(out['input_ids']), dtype=np.int64))
    return out
