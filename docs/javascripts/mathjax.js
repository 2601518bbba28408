// MathJax 3 reads the \( ... \) and \[ ... \] spans that pymdownx.arithmatex writes
// (generic mode), and nothing else on the page; it typesets again after each of
// Material's instant page loads.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*",
    processHtmlClass: "arithmatex",
  },
};

document$.subscribe(() => MathJax.typesetPromise());
