// Draws every <canvas class="chart" data-spec='{...}'> with the vendored Chart.js, and wires copy buttons.
// Specs are built on the server: {type, labels, datasets: [{label, data, color, axis}], unit, max}.
(function () {
  "use strict";

  function draw(canvas) {
    var spec;
    try { spec = JSON.parse(canvas.dataset.spec); } catch (e) { return; }
    var hasY2 = spec.datasets.some(function (d) { return d.axis === "y2"; });
    var datasets = spec.datasets.map(function (d) {
      return {
        label: d.label, data: d.data, borderColor: d.color, backgroundColor: d.color + (spec.type === "bar" ? "cc" : "33"),
        yAxisID: d.axis === "y2" ? "y2" : "y", spanGaps: true, pointRadius: 2, borderWidth: 2, tension: 0.2,
      };
    });
    var scales = {
      x: { ticks: { maxTicksLimit: 12, autoSkip: true }, grid: { display: false } },
      y: { beginAtZero: true, title: { display: !!spec.unit, text: spec.unit || "" } },
    };
    if (spec.max !== undefined) { scales.y.suggestedMax = spec.max; }
    if (hasY2) {
      scales.y2 = { beginAtZero: true, position: "right", grid: { drawOnChartArea: false },
                    title: { display: !!spec.unit2, text: spec.unit2 || "" } };
    }
    new window.Chart(canvas, {
      type: spec.type || "line",
      data: { labels: spec.labels, datasets: datasets },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
        scales: scales,
      },
    });
    canvas.dataset.drawn = "1";
  }

  function copy(button) {
    var text = button.dataset.copy;
    if (text === undefined && button.dataset.copyFrom) {
      text = document.getElementById(button.dataset.copyFrom).textContent;
    }
    var done = function () {
      button.classList.add("done");
      button.textContent = "Copied";
      setTimeout(function () { button.classList.remove("done"); button.textContent = "Copy"; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () {});
    } else {  // plain http on a non-loopback host: fall back to a selection copy
      var area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      try { document.execCommand("copy"); done(); } catch (e) { /* nothing to do */ }
      document.body.removeChild(area);
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (window.Chart) {
      document.querySelectorAll("canvas.chart").forEach(draw);
    }
    // logs read from the end: show the newest lines first
    document.querySelectorAll("pre.log").forEach(function (p) { p.scrollTop = p.scrollHeight; });
    document.querySelectorAll("button.copy").forEach(function (b) {
      b.addEventListener("click", function () { copy(b); });
    });
  });
})();
