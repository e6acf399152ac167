"""The shared figure writer: the Agg backend, parent folders created, the figure closed."""

from __future__ import annotations

from mtlkit.core.figures import pyplot, save_figure


def test_save_figure_writes_a_png_into_new_folders_and_closes_the_figure(tmp_path):
    plt = pyplot()
    assert plt.get_backend().lower() == "agg"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "a" / "b" / "figure.png", dpi=50)
    assert out == tmp_path / "a" / "b" / "figure.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()
