"""What a person sees: circuitsvis views (`views`, offline HTML in notebooks and files) and
matplotlib figures (`plots`). `_html` builds the self-contained pages both views and the
report use.
"""

from tl_decomp.viz import plots, views
from tl_decomp.viz._html import Component, View, bundle, document, row

__all__ = ["Component", "View", "bundle", "document", "plots", "row", "views"]
