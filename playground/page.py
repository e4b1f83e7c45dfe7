"""The pane's page-wide look and one script (passed to `launch`): example chips at their own width, and a status
that says so when the app has stopped instead of showing the last "running · step N" as if it were current."""

CSS = """
#examples { flex-wrap: wrap; gap: 6px; }
#examples > button { flex: 0 0 auto !important; width: auto !important; }
body[data-offline] #status { opacity: .45; }
body[data-offline] #status::before { content: "⚠ The app has stopped or cannot be reached: this is the last status it sent.";
  display: block; color: #c92a2a; font-weight: 600; opacity: 1; }
"""

# Every 2 s the page asks the server for its headers (a HEAD request, no body): no answer marks the page offline.
HEAD = """<script>
(() => {
  const check = () => fetch(location.pathname, {method: "HEAD", cache: "no-store"})
    .then(() => document.body && document.body.removeAttribute("data-offline"))
    .catch(() => document.body && document.body.setAttribute("data-offline", ""));
  setInterval(check, 2000);
})();
</script>"""

LAUNCH = {"css": CSS, "head": HEAD}  # demo.launch(**LAUNCH, ...)
