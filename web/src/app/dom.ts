/** The page's element with `id`; the page is the app's own index.html, so a missing one is a build error. */
export function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`the page has no #${id}`);
  return found as T;
}
