"""The search tool and its index: the tool (:mod:`~nat_ray.tools.search.tool`), the vector store it
reads (:mod:`~nat_ray.tools.search.index_store`) and the Ray Data job that builds one
(:mod:`~nat_ray.tools.search.index_build`).
"""
