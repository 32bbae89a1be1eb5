// comfyui-dmd2 where a user looks for it: the template browser and the node search.
//
// Templates: frontend 1.32.9 gets only the file names of a pack's templates from the server
// (GET /workflow_templates answers {pack: [stem, ...]}) and shows each with the stem as title
// and description (workflowTemplatesStore.ts, enhancedTemplates). The titles, descriptions and
// tags in templates.json (beside this file) are put on those entries once the store has loaded
// them, before the browser's search (Fuse over name, title, description, tags) indexes them.
//
// Node search: frontend 1.32.9 searches node definitions by name and display_name only
// (services/nodeSearchService.ts). The pack's nodes carry search_aliases in /object_info
// (nodes/search.py); a search whose words begin an alias also offers those nodes, after the
// nodes whose names contain the query.
import { app } from "../../scripts/app.js";

// The pack's name as the server knows it: /extensions/<pack>/browse.js.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2));
const TEMPLATES = fetch(new URL("templates.json", import.meta.url))
  .then((response) => (response.ok ? response.json() : {}))
  .catch(() => ({}));
const ALIASES = new Map();  // node type -> its aliases, normalised

const normalise = (text) => String(text).toLowerCase().replace(/[-_\s]+/g, " ").trim();

// The frontend's Pinia store of that id, where the app exposes it (undefined otherwise).
function pinia() {
  return document.getElementById("vue-app")?.__vue_app__?.config?.globalProperties?.$pinia;
}

function onStore(id, use) {
  const store = pinia()?._s?.get(id);
  if (store) use(store);
  else pinia()?.use(({ store: created }) => { if (created.$id === id) use(created); });
}

export async function describeTemplates(store) {
  const meta = await TEMPLATES;
  for (const template of store.enhancedTemplates ?? []) {
    const entry = template.sourceModule === PACK && meta[template.name];
    if (!entry) continue;
    Object.assign(template, {
      title: entry.title,
      description: entry.description,
      tags: entry.tags,
      searchableText: [entry.title, entry.description, PACK, ...entry.tags].join(" "),
    });
  }
}

function followTemplates(store) {
  store.$onAction(({ name, after }) => {
    if (name === "loadWorkflowTemplates") after(() => describeTemplates(store));
  });
  if (store.isLoaded) describeTemplates(store);
}

export function aliasMatches(aliases, query) {
  return query.length > 1 && aliases.some((alias) => alias.startsWith(query) || alias.includes(" " + query));
}

// Patched once on the class of the node search's Fuse wrapper (FuseSearch.search): every
// instance the frontend builds (it rebuilds one when the node definitions change) uses it.
function searchAliases(store) {
  const fuseSearch = store.nodeSearchService?.nodeFuseSearch;
  const proto = fuseSearch && Object.getPrototypeOf(fuseSearch);
  if (!proto || proto.dmd2Aliases) return;
  const search = proto.search;
  proto.dmd2Aliases = true;
  proto.search = function (query, options) {
    const results = search.call(this, query, options);
    const q = normalise(query ?? "");
    if (!q || !ALIASES.size || !Array.isArray(this.data)) return results;
    const hits = this.data.filter((def) => ALIASES.has(def?.name) && aliasMatches(ALIASES.get(def.name), q));
    if (!hits.length) return results;
    const named = (def) => [def.name, def.display_name].some((text) => normalise(text ?? "").includes(q));
    const strong = results.filter(named);
    const rest = results.filter((def) => !named(def) && !hits.includes(def));
    return [...strong, ...hits.filter((def) => !strong.includes(def)), ...rest];
  };
}

app.registerExtension({
  name: "comfyui-dmd2.browse",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.search_aliases?.length) ALIASES.set(nodeData.name, nodeData.search_aliases.map(normalise));
  },
  setup() {
    onStore("workflowTemplates", followTemplates);
    onStore("nodeDef", searchAliases);
  },
});
