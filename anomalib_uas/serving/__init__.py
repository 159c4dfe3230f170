# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Serving registered models: the MLflow pyfunc, its exported-graph runtime, and the bounded REST server.

* :mod:`~anomalib_uas.serving.pyfunc`: the pyfunc of every registered version (REST, in process, Spark);
* :mod:`~anomalib_uas.serving.runtime`: ONNX export at registration, the graph runner and the micro-batcher;
* :mod:`~anomalib_uas.serving.decoding`: a request's images within its pixel budget and path policy;
* :mod:`~anomalib_uas.serving.limits`: the bounds of a request and the error that names them;
* :mod:`~anomalib_uas.serving.http`: ``uas serve``, MLflow's scoring endpoints behind those bounds.

The package itself imports only the limits, so that the command line starts fast; import the rest from its module.

Example:
    >>> from anomalib_uas.serving import Limits
    >>> from anomalib_uas.serving.http import serve
    >>> serve("models:/anomalib-uas-brick@champion", limits=Limits(max_rows=4))  # doctest: +SKIP
"""

from anomalib_uas.serving.limits import BadRequest, Limits

__all__ = ["BadRequest", "Limits"]
