//! Image preprocessing for Glm4v (AutoGLM-Phone-9B), as transformers' `Glm4vImageProcessor` does
//! it: pure functions with no backend.
