"""One self-contained HTML page on one text (`report`): the `Report` result (`_result`), how
it is computed (`_report`) and how it is drawn (`_page`).
"""

from tl_decomp.reporting._report import check_path, report
from tl_decomp.reporting._result import Report

__all__ = ["Report", "check_path", "report"]
