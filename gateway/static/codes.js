// Copy and download for the recovery codes page (codes.html). Inlined into the page and
// allowed by its hash in the Content-Security-Policy (gateway/pages.py); the codes never
// leave the browser: the download is a Blob made here, not a request.
(function () {
  var list = document.getElementById("recovery-codes");
  var actions = document.getElementById("code-actions");
  if (!list || !actions) return;
  var codes = Array.prototype.map.call(list.querySelectorAll("code"), function (c) { return c.textContent; });
  var text = codes.join("\n") + "\n";
  var status = document.getElementById("copy-status");
  actions.hidden = false;
  document.getElementById("copy-codes").addEventListener("click", function () {
    if (!navigator.clipboard) { status.textContent = "Copying is not available here: select the codes instead."; return; }
    navigator.clipboard.writeText(text).then(
      function () { status.textContent = "Copied."; },
      function () { status.textContent = "Copying failed: select the codes instead."; }
    );
  });
  document.getElementById("download-codes").addEventListener("click", function () {
    var url = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
    var a = document.createElement("a");
    a.href = url;
    a.download = "recovery-codes.txt";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  });
})();
