"""The gradio demo (`dclip demo`, and the Space in `spaces_demo/`): `app` builds and serves it, `gallery` holds the
images it searches, `models` chooses and loads the models, `region_view` draws the teacher's regions."""
