"""What a person sees: circuitsvis views (`views`, offline HTML in notebooks and files) and
matplotlib figures (`plots`). `_html` builds the self-contained pages both views and the
report use.
"""

from tl_decomp.viz import plots, views

__all__ = ["plots", "views"]
