"""Template and input processor of a model: built lazily from the model's own folder, replaceable by name."""
from __future__ import annotations

from typing import Any, Optional

from ..registry import resolve
from ..runtime.remote import remote_function


class TemplateProcessorMixin:
    """Needs ``self.model_dir``; provides ``template``, ``processor``, ``tokenizer`` and their setters."""

    model_dir: Optional[str]
    _template: Any = None
    _processor: Any = None

    @property
    def template(self) -> Any:
        if self._template is None:
            self._template = resolve('template', 'Template')(model_id=self.model_dir)
        return self._template

    @property
    def processor(self) -> Any:
        if self._processor is None:
            self._processor = resolve('processor', 'InputProcessor')(pad_token_id=self.template.pad_token_id)
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return self.template.tokenizer

    @remote_function(dispatch='all', collect='first')
    def set_template(self, template: Any, **kwargs: Any) -> None:
        if isinstance(template, (str, type)):
            kwargs.setdefault('model_id', self.model_dir)
            template = resolve('template', template)(**kwargs)
        self._template = template

    @remote_function(dispatch='all', collect='first')
    def set_processor(self, processor: Any, **kwargs: Any) -> None:
        if isinstance(processor, (str, type)):
            kwargs.setdefault('pad_token_id', self.template.pad_token_id)
            processor = resolve('processor', processor)(**kwargs)
        self._processor = processor
