// MathJax 3's settings for the book (mkdocs.yml loads this before MathJax itself).
// docs/math.md's formulas reach the page as \( \) and \[ \] (pymdownx.arithmatex); the notebooks'
// markdown cells keep Jupyter's $ and $$, so both pairs of delimiters are read.
window.MathJax = {
  tex: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,   // \$ is a dollar sign, not the start of a formula
  },
};
