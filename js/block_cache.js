// Shows each Block Cache node's summary text (e.g. the estimated speed-up) on the node after it runs.
// The live heatmaps and interactive threshold tuning come in a later version.
import { app } from "../../scripts/app.js";

const NODES_WITH_SUMMARY = new Set([
  "BlockCacheProfile",
  "BlockCacheBuildSchedule",
  "BlockCacheSaveSchedule",
  "BlockCacheLoadSchedule",
]);

app.registerExtension({
  name: "block_cache.summary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_SUMMARY.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === "block_cache_summary");
      if (!widget) {
        const element = document.createElement("div");
        element.style.cssText = "font: 12px monospace; white-space: pre-wrap; opacity: 0.85; padding: 2px 4px;";
        widget = this.addDOMWidget("block_cache_summary", "block_cache_summary", element, { serialize: false });
      }
      widget.element.textContent = text;
    };
  },
});
