"""Search a gallery with a trained student: a faiss index of its image embeddings (`index`), and the DCLIP teacher
as a re-ranker of the student's top-k (`rerank`)."""

from .index import GalleryItems, SearchIndex, build_faiss_index, build_index, gallery_items, load_index

__all__ = ["GalleryItems", "SearchIndex", "build_faiss_index", "build_index", "gallery_items", "load_index"]
