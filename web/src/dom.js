// Building DOM nodes without innerHTML: attributes are set as attributes and text as text, so
// nothing from a peer or a model is ever parsed as markup.

export const h = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag)
  for (const [key, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value)
    else if (key === 'text') node.textContent = value
    else node.setAttribute(key, value === true ? '' : value)
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child)
  return node
}
