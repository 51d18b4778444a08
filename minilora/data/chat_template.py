"""Chat templates: a model file's Jinja template rendered in a sandbox, as Hugging Face renders it.

A chat model was trained on conversations laid out one exact way (SmolLM2 writes
``<|im_start|>user\\nHi<|im_end|>\\n``, ChatML); the file ships that layout as a Jinja template
(``tokenizer.chat_template`` in a GGUF, ``chat_template`` in tokenizer_config.json or a
``chat_template.jinja`` file), and transformers' ``apply_chat_template`` renders it. So does
``render_chat_template`` here, with the same environment:

- ``jinja2.sandbox.ImmutableSandboxedEnvironment``: a template comes from a downloaded file, so it
  is untrusted code; the sandbox refuses attribute paths such as ``__class__.__mro__`` that lead
  from a string to Python's internals (and from there to ``os``), and the immutable variant also
  refuses to mutate lists and dicts passed in (``messages.append(...)``);
- ``trim_blocks`` and ``lstrip_blocks`` (a ``{% ... %}`` tag leaves no newline or indentation
  behind), and the ``loopcontrols`` extension (``{% break %}``, ``{% continue %}``);
- the helpers templates call: ``raise_exception(message)``, ``strftime_now(format)``, and a
  ``tojson`` filter that does not escape HTML characters (Jinja's own writes ``<`` as ``\\u003c``).

Any error while compiling or rendering (a syntax error, an undefined name, a refused attribute, a
template's own ``raise_exception``) becomes a one-line ``ChatTemplateError`` (a ``ValueError``).
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render (or the sandbox refused what it tried)."""


def _raise_exception(message):
    # templates call this to reject a conversation they cannot lay out (e.g. roles out of order)
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """``template`` compiled in the sandboxed environment described above (cached per string)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile ({_one_line(e)}); fix the "
                                "template's Jinja syntax") from None


def render_chat_template(template: str, messages, add_generation_prompt: bool = False,
                         **variables) -> str:
    """The text of ``messages`` (a list of ``{"role": ..., "content": ...}`` dicts) laid out by
    ``template``; ``add_generation_prompt`` asks the template to open the assistant's turn.
    ``variables`` are passed to the template too (transformers passes the special tokens:
    ``bos_token``, ``eos_token``, ...)."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of dicts like {'role': 'user', "
                                f"'content': 'Hi'}}, got {type(messages).__name__}; wrap a "
                                "single message in a list")
    compiled = compile_chat_template(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               **variables)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried an unsafe operation and the sandbox "
                                f"refused it ({_one_line(e)}); a template may only read its "
                                "variables and write text, so use a template from a trusted "
                                "model file") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed to render ({_one_line(e)}); check "
                                "the messages' roles and keys against what the template "
                                "expects") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


__all__ = ["ChatTemplateError", "compile_chat_template", "render_chat_template"]
