"""Prompt formats: how a dialogue becomes the LLM's text, which of its tokens
train, and how a reply is read back (``model.llm.prompt_format``).

The collator hands a format the dialogue as role/content messages (consecutive
turns of one speaker merged, photos already written as ``[img] … [/img]`` and
``<image>`` slots). A format decides

* ``roles``: which speaker is ``user`` and which ``assistant``;
* ``agents``: which training samples a dialogue gives (one per speaker, or one);
* ``render`` / ``assistant_spans``: the training text and the characters that are
  labelled (``scores_all``: every token);
* ``prompt``: the text the model continues to write the next turn;
* ``clean``: the reply as the user sees it.

Built in:

``template`` (default): the tokenizer's own chat template. One sample per
speaker as the agent; the agent's turns are ``assistant`` messages and are the
only ones trained. Robust to templates that require the user to speak first
(Llama-2-chat raises otherwise): an agent-first dialogue opens with an empty
user message. An optional system prompt is a ``system`` message.

``reference``: the authors' Llama-2 format (Guo et al., E2E_PSDG): roles by
position, the dialogue's first speaker is the ``user``; the system prompt is
folded into the first user message as ``<<SYS>>\\n…\\n<</SYS>>\\n\\n``; a user turn is
``<s>[INST] … [/INST]</s>``, an assistant turn `` … </s>`` (every turn ends with
EOS, unlike Llama-2-chat's own template). One sample per dialogue, every token
scored. To make the model write a *user* turn (a context that ends with an
assistant turn), ``<s>[INST]`` is appended and ``[INST]``/``[/INST]`` are
stripped from the reply, as the reference evaluates both speakers.

A new format is a ``PromptFormat`` subclass returned by a plugin's
``mmdialog_prompt_formats`` hook (``core/hookspecs.py``); its ``name`` is then a
value of ``model.llm.prompt_format``.
"""
from __future__ import annotations

from typing import Any, ClassVar

from mmdialog.core.hookspecs import hookimpl

Message = dict[str, str]

#: The reference's system prompt, verbatim: it explains the description markup.
REFERENCE_SYSTEM_PROMPT = (
    "You are a multi-modal dialogue chatbot. Given the dialogue context, please generate the corresponding "
    "response.\n\nThe text between [img] and [/img] is the image description.")


class PromptFormat:
    """One way to turn messages into LLM text. ``llm`` is the ``LanguageModel``
    (its ``tokenizer`` and ``render``); ``system_prompt`` None means the format's default."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: every token of a sample is a label (else only the assistant's spans)
    scores_all: ClassVar[bool] = False
    default_system_prompt: ClassVar[str | None] = None

    def __init__(self, llm: Any, system_prompt: str | None = None) -> None:
        self.llm = llm
        self.system_prompt = self.default_system_prompt if system_prompt is None else system_prompt

    # -- who speaks as whom ------------------------------------------------------------------
    def roles(self, speakers: list[str], agent: str) -> list[str]:
        """``user``/``assistant`` for each turn's speaker: the agent is the assistant."""
        return ["assistant" if s == agent else "user" for s in speakers]

    def agents(self, speakers: list[str], sharers: list[str], both_speakers: bool) -> list[str]:
        """The training samples of one dialogue, by agent: every speaker, or only the sharers."""
        return list(dict.fromkeys(speakers if both_speakers else sharers))

    # -- text ----------------------------------------------------------------------------------
    def arrange(self, messages: list[Message]) -> list[Message]:
        """The messages as ``render`` and ``prompt`` take them (a leading turn, a system message)."""
        return messages

    def render(self, messages: list[Message]) -> str:
        raise NotImplementedError

    def prompt(self, messages: list[Message]) -> str:
        """The text after which the model writes the next turn."""
        raise NotImplementedError

    def assistant_spans(self, messages: list[Message], text: str) -> list[tuple[int, int]]:
        """Character spans of ``text`` (= ``render(messages)``) that are labelled: what each
        assistant message adds to the rendered prefix (its content and end-of-turn marker),
        so any prefix-stable format works.

        The prefixes are not rendered one by one: each message's content is found in
        ``text`` in order, followed by the end-of-turn marker of its role (``_turn_ends``,
        rendered once per format). Where that reading fails (a content the format
        rewrites), that message's prefix is rendered, as the definition says."""
        ends = self._turn_ends()
        spans, prev = [], 0  # prev: where the rendered prefix of the messages so far ends
        for i, m in enumerate(messages):
            content, mark = m["content"], ends.get(m["role"])
            at = text.find(content, prev) if content and mark is not None else -1
            if at >= 0 and text.startswith(mark, at + len(content)):
                start, end = at, at + len(content) + len(mark)
            else:
                end = len(self.render(messages[: i + 1]))
                start = text.find(content, prev)
                start = start if start >= 0 else prev
            if m["role"] == "assistant":
                spans.append((start, end))
            prev = end
        return spans

    def _turn_ends(self) -> dict[str, str]:
        """Role → what the format writes right after a message's content (``<|im_end|>\\n``,
        `` [/INST]``), from two probes rendered once per format; a role whose probe shows
        nothing clear is left out."""
        if "_ends" not in self.__dict__:
            probe, ends = "\x00probe\x00", {}
            for role, msgs in (("user", [{"role": "user", "content": probe}]),
                               ("assistant", [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": probe}])):
                try:
                    text = self.render(msgs)
                except Exception:  # a template that refuses the probe: render every prefix
                    continue
                if text.count(probe) == 1:
                    ends[role] = text[text.index(probe) + len(probe):]
            self._ends = ends
        return self._ends

    def dialogue_start(self, text: str) -> int:
        """The first character of ``text`` after the system prompt: the reference's system
        prompt names ``[img]`` and ``[/img]``, which are not a photo's description span."""
        if not self.system_prompt:
            return 0
        at = text.find(self.system_prompt)
        return at + len(self.system_prompt) if at >= 0 else 0

    def clean(self, reply: str) -> str:
        """The decoded reply as the user sees it."""
        return reply.strip()


class TemplateFormat(PromptFormat):
    name = "template"
    description = "the tokenizer's chat template; one sample per speaker, the agent's turns trained"

    def arrange(self, messages: list[Message]) -> list[Message]:
        out = list(messages)
        if out and out[0]["role"] == "assistant" and self.llm.user_first:
            out.insert(0, {"role": "user", "content": ""})  # the template wants the user first
        if self.system_prompt:
            out.insert(0, {"role": "system", "content": self.system_prompt})
        return out

    def render(self, messages: list[Message]) -> str:
        return self.llm.render(messages) if messages else ""

    def prompt(self, messages: list[Message]) -> str:
        return self.llm.render(messages, add_generation_prompt=True)


class ReferenceFormat(PromptFormat):
    name = "reference"
    description = ("the authors' Llama-2 format and system prompt; one sample per dialogue, the first "
                   "speaker is the user, every token trained")
    scores_all = True
    default_system_prompt = REFERENCE_SYSTEM_PROMPT

    def roles(self, speakers: list[str], agent: str) -> list[str]:
        # By position, as the reference builds its samples: the first speaker's turns are the
        # user's, and the role changes with the speaker (consecutive turns of one speaker merge).
        out: list[str] = []
        for i, s in enumerate(speakers):
            same = i > 0 and s == speakers[i - 1]
            out.append(out[-1] if same else ("user" if not out or out[-1] == "assistant" else "assistant"))
        return out

    def agents(self, speakers: list[str], sharers: list[str], both_speakers: bool) -> list[str]:
        # One sample per dialogue: roles do not depend on the agent; it names the sample
        # (the assistant-role speaker, or the only one).
        distinct = list(dict.fromkeys(speakers))
        return distinct[1:2] or distinct[:1]

    def _special(self) -> tuple[str, str]:
        tok = self.llm.tokenizer
        return tok.bos_token or "", tok.eos_token or ""

    def render(self, messages: list[Message]) -> str:
        bos, eos = self._special()
        out = []
        for i, m in enumerate(messages):
            content = m["content"]
            if i == 0 and self.system_prompt:
                content = f"<<SYS>>\n{self.system_prompt}\n<</SYS>>\n\n{content}"
            content = content.strip()
            out.append(f"{bos}[INST] {content} [/INST]{eos}" if m["role"] == "user" else f" {content} {eos}")
        return "".join(out)

    def prompt(self, messages: list[Message]) -> str:
        bos, _ = self._special()
        if not messages:  # no context: the model writes the first user message, after the system prompt
            return f"{bos}[INST] <<SYS>>\n{self.system_prompt}\n<</SYS>>\n\n" if self.system_prompt else f"{bos}[INST]"
        # After a user turn the model writes the assistant's (the template adds no generation
        # prompt); after an assistant turn the reference appends "<s>[INST]" so it writes the user's.
        return self.render(messages) + (f"{bos}[INST]" if messages[-1]["role"] == "assistant" else "")

    def clean(self, reply: str) -> str:
        # Their batch_decode(clean_up_tokenization_spaces=True), then [INST] / [/INST] stripped.
        for before, after in _CLEAN_UP:
            reply = reply.replace(before, after)
        return " ".join(reply.replace("[INST]", " ").replace("[/INST]", " ").split())


#: transformers 4's clean_up_tokenization, which the reference's decode applies: "how was it ?" → "how was it?".
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@hookimpl
def mmdialog_prompt_formats() -> list[type[PromptFormat]]:
    return [TemplateFormat, ReferenceFormat]
